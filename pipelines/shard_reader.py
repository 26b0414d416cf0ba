"""Training reads of streamed shard sets without Ray Data's executor: a seeded read plan over the rows of a
:class:`pipelines.shard_index.ShardIndex`, read in the consuming process.

- :func:`epoch_batches`: the rows of an epoch in a seeded order, as ``(B, N)`` int16 batches assembled by a
  background thread. Rows of the one-row-per-row-group layout are addressable (the index has each segment's byte
  offset), so each segment is read with one ``preadv`` straight into its row of the batch (the only copy of the
  PCM). The order is a seeded uniform permutation of all the set's rows, new every epoch: a true global shuffle,
  and a seeded subset (the target set's per-run draw) reads only its rows.
- Shards written before that layout (a row group per file: 16 clips, or a MAESTRO performance) are read a row
  group at a time with pyarrow, in a seeded random row-group order, the rows mixed across a buffer of ``buffer``
  rows: global across row groups, local within ``buffer`` rows (rerun ``mdlda prepare --overwrite`` for the
  per-row layout); a subset then reads whole row groups around its rows.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq

from mdlda.pcm import DTYPE, from_column
from pipelines.shard_index import AUDIO, ShardIndex


class _Fds:
    """Open file descriptors of a pass (at most ``cap`` at once)."""

    def __init__(self, files: tuple[str, ...], cap: int = 256):
        self.files, self.cap, self.open = files, cap, {}

    def get(self, k: int) -> int:
        fd = self.open.get(k)
        if fd is None:
            if len(self.open) >= self.cap:
                self.close()
            fd = self.open[k] = os.open(self.files[k], os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self.open.values():
            os.close(fd)
        self.open = {}


def _read_rows(index: ShardIndex, rows: np.ndarray, fds: _Fds) -> dict[str, np.ndarray]:
    """A batch of addressable rows: each segment's PCM read straight into its row of a new ``(B, N)`` array."""
    out = {c: v[rows] for c, v in index.small.items()}
    if AUDIO in index.columns:
        pcm = np.empty((len(rows), index.width // DTYPE.itemsize), dtype=DTYPE)
        for i, r in enumerate(rows):
            got = os.preadv(fds.get(int(index.file[r])), [pcm[i]], int(index.offset[r]))
            if got != index.width:
                raise OSError(f"{index.files[index.file[r]]}: short read of a segment ({got} of {index.width} bytes)")
        out[AUDIO] = pcm
    return {c: out[c] for c in index.columns}


def _row_batches(index: ShardIndex, batch_size: int, seed: int | None, drop_last: bool):
    order = np.arange(len(index)) if seed is None else np.random.default_rng(seed % 2**63).permutation(len(index))
    fds = _Fds(index.files)
    try:
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            if len(rows) < batch_size and drop_last:
                return
            yield _read_rows(index, rows, fds)
    finally:
        fds.close()


def _group_batches(index: ShardIndex, batch_size: int, seed: int | None, buffer: int, drop_last: bool):
    """Older shards: whole row groups in a seeded order, rows mixed across ``buffer`` rows."""
    keys = index.file.astype(np.int64) << 32 | index.row_group.astype(np.int64)
    uniq, inverse = np.unique(keys, return_inverse=True)
    units = [np.flatnonzero(inverse == u) for u in range(len(uniq))]
    if seed is not None:
        units = [units[i] for i in np.random.default_rng(seed % 2**63).permutation(len(units))]
    rng = np.random.default_rng(None if seed is None else (seed + 1) % 2**63)
    buffer = max(buffer, batch_size) if seed is not None else 0
    files: dict[int, pq.ParquetFile] = {}
    pool: list[tuple[np.ndarray | None, int]] = []  # (a row group's PCM, position in the index)
    units_iter = iter(units)
    done = False
    while True:
        while not done and len(pool) < buffer + batch_size:
            unit = next(units_iter, None)
            if unit is None:
                done = True
                break
            k, g = int(index.file[unit[0]]), int(index.row_group[unit[0]])
            pcm = None
            if AUDIO in index.columns:
                pf = files.get(k) or files.setdefault(k, pq.ParquetFile(index.files[k], memory_map=True))
                pcm = from_column(pf.read_row_group(g, columns=[AUDIO], use_threads=False).column(AUDIO))
            pool.extend((pcm, int(p)) for p in unit)
        if not pool or (len(pool) < batch_size and drop_last):
            return
        n = min(batch_size, len(pool))
        if seed is not None:
            pick = rng.choice(len(pool), size=n, replace=False)
            chosen = [pool[i] for i in pick]
            for i in sorted(pick, reverse=True):  # swap-remove, highest positions first
                pool[i] = pool[-1]
                pool.pop()
        else:
            chosen, pool = pool[:n], pool[n:]
        positions = np.array([p for _, p in chosen])
        out = {c: v[positions] for c, v in index.small.items()}
        if AUDIO in index.columns:
            out[AUDIO] = np.stack([pcm[index.row[p]] for pcm, p in chosen])
        yield {c: out[c] for c in index.columns}


_DONE = object()


def _produce(batches, out: queue.Queue, stop: threading.Event) -> None:
    try:
        for b in batches:
            if stop.is_set():
                return
            out.put(b)
        out.put(_DONE)
    except BaseException as exc:  # noqa: BLE001 (handed to the consumer, raised there)
        out.put(exc)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def epoch_batches(
    index: ShardIndex,
    batch_size: int,
    seed: int | None,
    buffer: int = 0,
    drop_last: bool = False,
    prefetch: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the index's rows as numpy batches (``audio`` ``(B, N)`` int16, ``labels`` ``(B, k)`` float32,
    the other columns as arrays, as :func:`mdlda.pcm.numpy_batch` gives them), in a seeded order (module
    docstring); without a seed, in storage order. ``buffer``: rows mixed across row groups in shards of the older
    layout. Batches are assembled ``prefetch`` ahead by a background thread."""
    if index.addressable:
        batches = _row_batches(index, batch_size, seed, drop_last)
    else:
        batches = _group_batches(index, batch_size, seed, buffer, drop_last)
    return background(batches, prefetch)


def background(batches: Iterator, prefetch: int = 4) -> Iterator:
    """``batches`` produced by a background thread, up to ``prefetch`` ahead (the reads and copies release the
    GIL, so they overlap the consumer's work); closing the result stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    thread = threading.Thread(target=_produce, args=(batches, q, stop), daemon=True, name="shard-reader")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock the producer if it waits on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)
