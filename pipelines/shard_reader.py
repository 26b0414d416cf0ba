"""Training reads of streamed shard sets without Ray Data's executor: a row index from the Parquet metadata, and
a seeded read plan over row groups, read in the consuming process.

Why: a set that does not fit in the object store is read every epoch. Through Ray Data that meant a read task
per file, the split selected by a filter that copies every selected segment, every block copied into the object
store and again into batches, and (for a global shuffle) all bytes through ``random_shuffle``'s map and reduce
tasks, plus Ray Data's start-up every epoch (bench/datapath.py measures it; figures in bench/README.md).

- :class:`ShardIndex`: one entry per selected row (file, row group, row within it), built from each file's
  Parquet footer and, only for a row group whose ``split`` statistics (min != max) say it mixes splits, its
  ``split`` column. No audio is read to build it, and a split is selected without copying anything.
- :func:`epoch_batches`: the rows of an epoch in a seeded order: a seeded permutation of the row groups holding
  the wanted rows, each read whole (``ParquetFile.read_row_group``, memory-mapped) by a background thread, the
  rows of the row groups read so far mixed in a seeded buffer of ``buffer`` rows, and gathered into ``(B, N)``
  int16 batches (the only copy of the PCM after the read).

How global the shuffle is: prepare writes one row per row group (``WRITE_OPTIONS`` in pipelines/shards.py), so a
permutation of the row groups *is* a uniform permutation of the rows, new every epoch, with no buffer needed.
Shards written before that hold up to a file per row group (16 clips, or a MAESTRO performance): their rows
then come out in a random row-group order, mixed only across the ``buffer`` rows around them (rerun
``mdlda prepare --overwrite`` to get the per-row layout). A seeded subset of rows (the target set's per-run
draw) reads only the row groups holding a drawn row: with one row per row group, no audio of a row not taken.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mdlda.manifest import DATA_DIR
from mdlda.pcm import numpy_batch

SPLIT = "split"


@dataclass(frozen=True)
class ShardIndex:
    """The selected rows of a shard folder, in storage order: ``file[i]``, ``row_group[i]``, ``row[i]`` (the row
    within its row group). Small (three int32 per row) and picklable: it travels with the Dataset to trials."""

    files: tuple[str, ...]
    columns: tuple[str, ...]
    file: np.ndarray
    row_group: np.ndarray
    row: np.ndarray

    def __len__(self) -> int:
        return len(self.file)

    def take(self, rows: np.ndarray) -> ShardIndex:
        """The index of a subset of rows (positions in this index), in the given order."""
        return ShardIndex(self.files, self.columns, self.file[rows], self.row_group[rows], self.row[rows])

    def sample(self, n: int, seed: int) -> ShardIndex:
        """A seeded random subset of ``n`` rows (all when there are fewer), in storage order; reads nothing."""
        if n >= len(self):
            return self
        pick = np.sort(np.random.default_rng(seed % 2**63).choice(len(self), size=n, replace=False))
        return self.take(pick)

    @property
    def rows_per_group(self) -> int:
        """The most selected rows any row group holds (1: the row-group order is the row order)."""
        if not len(self):
            return 0
        keys = self.file.astype(np.int64) << 32 | self.row_group.astype(np.int64)
        return int(np.unique(keys, return_counts=True)[1].max())


def build_index(folder: str | Path, splits: Sequence[str] | None, columns: Sequence[str]) -> ShardIndex:
    """The rows of ``splits`` (all rows when None) of the shard folder, from the Parquet footers and, only for row
    groups whose statistics say they mix splits, the ``split`` column."""
    files = sorted(str(f) for f in (Path(folder) / DATA_DIR).glob("*.parquet"))
    wanted = None if splits is None else set(splits)
    fi, rgi, ri = [], [], []
    for k, path in enumerate(files):
        pf = pq.ParquetFile(path)
        md = pf.metadata
        col = md.schema.to_arrow_schema().get_field_index(SPLIT)
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if n == 0:
                continue
            if wanted is None:
                rows = np.arange(n)
            else:
                stats = md.row_group(g).column(col).statistics if col >= 0 else None
                if stats is not None and stats.has_min_max and stats.min == stats.max:
                    rows = np.arange(n) if _text(stats.min) in wanted else np.arange(0)
                else:
                    split = pf.read_row_group(g, columns=[SPLIT]).column(SPLIT).to_numpy(zero_copy_only=False)
                    rows = np.flatnonzero(np.isin(split, list(wanted)))
            fi.append(np.full(len(rows), k, dtype=np.int32))
            rgi.append(np.full(len(rows), g, dtype=np.int32))
            ri.append(rows.astype(np.int32))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int32)  # noqa: E731
    return ShardIndex(tuple(files), tuple(columns), cat(fi), cat(rgi), cat(ri))


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _plan(index: ShardIndex, seed: int | None) -> list[tuple[int, int, np.ndarray]]:
    """The epoch's row groups, (file, row group, selected rows), in a seeded random order (storage order without
    a seed)."""
    keys = index.file.astype(np.int64) << 32 | index.row_group.astype(np.int64)
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    groups = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(uniq)))
    units = [
        (int(index.file[first[u]]), int(index.row_group[first[u]]), index.row[groups[bounds[u] - c : bounds[u]]])
        for u, c in enumerate(np.bincount(inverse, minlength=len(uniq)))
    ]
    if seed is not None:
        units = [units[i] for i in np.random.default_rng(seed % 2**63).permutation(len(units))]
    return units


class _Files:
    """Open Parquet files (memory-mapped), kept while a pass reads them."""

    def __init__(self, files: tuple[str, ...]):
        self.files, self.open = files, {}

    def read(self, k: int, group: int, columns: tuple[str, ...]) -> pa.Table:
        pf = self.open.get(k)
        if pf is None:
            pf = self.open[k] = pq.ParquetFile(self.files[k], memory_map=True)
        return pf.read_row_group(group, columns=list(columns), use_threads=False)


_DONE = object()


def _produce(units, files: _Files, columns, out: queue.Queue, stop: threading.Event) -> None:
    try:
        for k, g, rows in units:
            if stop.is_set():
                return
            cols = numpy_batch(files.read(k, g, columns))
            out.put((cols, rows))
        out.put(_DONE)
    except BaseException as exc:  # noqa: BLE001 (handed to the consumer, raised there)
        out.put(exc)


def epoch_batches(
    index: ShardIndex,
    batch_size: int,
    seed: int | None,
    buffer: int = 0,
    drop_last: bool = False,
    prefetch: int = 16,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the index's rows as numpy batches (``audio`` ``(B, N)`` int16, ``labels`` ``(B, k)`` float32,
    the other columns as arrays; :func:`mdlda.pcm.numpy_batch`'s types), in a seeded order (see the module
    docstring); without a seed, in storage order. ``buffer``: rows mixed across row groups (only used when a row
    group holds more than one selected row). Row groups are read ``prefetch`` ahead by a background thread."""
    units = _plan(index, seed)
    rng = np.random.default_rng(None if seed is None else (seed + 1) % 2**63)
    mix = seed is not None and index.rows_per_group > 1
    buffer = max(buffer, batch_size) if mix else 0
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    files = _Files(index.files)
    thread = threading.Thread(target=_produce, args=(units, files, index.columns, q, stop), daemon=True)
    thread.start()
    pool: list[tuple[dict, int]] = []  # (a row group's columns, row in it)
    done = False
    try:
        while True:
            while not done and len(pool) < buffer + batch_size:
                item = q.get()
                if item is _DONE:
                    done = True
                elif isinstance(item, BaseException):
                    raise item
                else:
                    cols, rows = item
                    pool.extend((cols, int(r)) for r in rows)
            if not pool:
                return
            n = min(batch_size, len(pool))
            if n < batch_size and drop_last:
                return
            if mix:
                pick = rng.choice(len(pool), size=n, replace=False)
                chosen = [pool[i] for i in pick]
                for i in sorted(pick, reverse=True):  # O(n) per removal on a small pool
                    pool[i] = pool[-1]
                    pool.pop()
            else:
                chosen, pool = pool[:n], pool[n:]
            yield _gather(chosen)
    finally:
        stop.set()
        while thread.is_alive():  # unblock the producer if it waits on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)


def _gather(rows: list[tuple[dict, int]]) -> dict[str, np.ndarray]:
    """Rows of several row groups -> one batch; the PCM copied once, into a new ``(B, N)`` array."""
    out = {}
    for name, first in rows[0][0].items():
        if first.ndim == 2:
            arr = np.empty((len(rows), first.shape[1]), dtype=first.dtype)
            for i, (cols, r) in enumerate(rows):
                arr[i] = cols[name][r]
            out[name] = arr
        else:
            out[name] = np.array([cols[name][r] for cols, r in rows], dtype=first.dtype)
    return out
