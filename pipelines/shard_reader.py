"""Training reads of streamed shard sets without Ray Data's executor: a row index from the Parquet files, and a
seeded read plan over rows, read in the consuming process.

Why: a set that does not fit in the object store is read every epoch. Through Ray Data that meant a read task
per file, the split selected by a filter that copies every selected segment, every block copied into the object
store and again into batches, and (for a global shuffle) all bytes through ``random_shuffle``'s map and reduce
tasks, plus Ray Data's start-up every epoch (bench/datapath.py measures it; figures in bench/README.md).

- :func:`build_index` (:class:`ShardIndex`): one entry per selected row, from each file's footer and its small
  columns (``split``, ``clip_id``, ``labels``, ...: a few bytes per row, read once and kept in the index). No
  audio is read to build it, and a split is selected without copying any.
- :func:`epoch_batches`: the rows of an epoch in a seeded order, as ``(B, N)`` int16 batches assembled by a
  background thread. Prepare writes one row per row group (``WRITE_OPTIONS`` in pipelines/shards.py), and the
  audio column uncompressed: a row group's audio chunk is then one page whose last ``SEGMENT_BYTES`` bytes are the
  segment's PCM, so each segment is read with one ``preadv`` straight into its row of the batch (the only copy of
  the PCM), at the offset the footer gives. The order is a seeded uniform permutation of all the set's rows, new
  every epoch: a true global shuffle, and a seeded subset (the target set's per-run draw) reads only its rows.
- Shards written before that layout (a row group per file: 16 clips, or a MAESTRO performance) are read a row
  group at a time with pyarrow, in a seeded random row-group order, the rows mixed across a buffer of ``buffer``
  rows: global across row groups, local within ``buffer`` rows (rerun ``mdlda prepare --overwrite`` for the
  per-row layout); a subset then reads whole row groups around its rows.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mdlda.manifest import DATA_DIR
from mdlda.params import SEGMENT_BYTES
from mdlda.pcm import DTYPE, from_column, numpy_batch

logger = logging.getLogger(__name__)

SPLIT = "split"
AUDIO = "audio"
_HEADER_MAX = 1024  # bytes of page header and levels before the one value of a one-row audio chunk


@dataclass(frozen=True)
class ShardIndex:
    """The selected rows of a shard folder, in storage order: ``file[i]``, ``row_group[i]``, ``row[i]`` (the row in
    its row group), ``offset[i]`` (byte offset of its PCM in the file, -1 when not addressable) and the requested
    small columns' values (``small``). Picklable: it travels with the Dataset to trials."""

    files: tuple[str, ...]
    columns: tuple[str, ...]
    file: np.ndarray
    row_group: np.ndarray
    row: np.ndarray
    offset: np.ndarray
    small: dict[str, np.ndarray] = field(default_factory=dict)
    width: int = SEGMENT_BYTES  # bytes of PCM per segment (the audio column's fixed size)

    def __len__(self) -> int:
        return len(self.file)

    def take(self, rows: np.ndarray) -> ShardIndex:
        """The index of a subset of rows (positions in this index), in the given order."""
        small = {k: v[rows] for k, v in self.small.items()}
        return ShardIndex(
            self.files,
            self.columns,
            self.file[rows],
            self.row_group[rows],
            self.row[rows],
            self.offset[rows],
            small,
            self.width,
        )

    def sample(self, n: int, seed: int) -> ShardIndex:
        """A seeded random subset of ``n`` rows (all when there are fewer), in storage order; reads nothing."""
        if n >= len(self):
            return self
        pick = np.sort(np.random.default_rng(seed % 2**63).choice(len(self), size=n, replace=False))
        return self.take(pick)

    @property
    def addressable(self) -> bool:
        """Every row's PCM at a known byte offset (one row per row group, uncompressed): read row by row."""
        return AUDIO not in self.columns or bool(len(self) and (self.offset >= 0).all())


def _leaf(md: pq.FileMetaData, name: str) -> int:
    for i in range(md.num_columns):
        if md.schema.column(i).path == name:
            return i
    return -1


def _pcm_offset(md: pq.FileMetaData, group: int, leaf: int, width: int) -> int:
    """Byte offset of the PCM of a one-row row group's audio chunk, or -1 (several rows, compressed, encoded)."""
    if leaf < 0 or md.row_group(group).num_rows != 1:
        return -1
    c = md.row_group(group).column(leaf)
    extra = c.total_compressed_size - width
    ok = (
        c.physical_type == "FIXED_LEN_BYTE_ARRAY"
        and c.compression == "UNCOMPRESSED"
        and not c.has_dictionary_page
        and c.num_values == 1
        and 0 <= extra < _HEADER_MAX
    )
    return c.data_page_offset + extra if ok else -1


def _file_rows(path: str, wanted: list[str] | None, columns: Sequence[str]) -> dict | None:
    """One file's selected rows: row group, row in it, PCM offset, the small columns; None when it has none."""
    small_cols = [c for c in columns if c != AUDIO]
    pf = pq.ParquetFile(path)
    md = pf.metadata
    width = pf.schema_arrow.field(AUDIO).type.byte_width if AUDIO in columns else SEGMENT_BYTES
    if md.num_rows == 0:
        return None
    read = [*small_cols, *([SPLIT] if wanted is not None and SPLIT not in small_cols else [])]
    table = pf.read(columns=read, use_threads=False) if read else None
    sizes = np.array([md.row_group(g).num_rows for g in range(md.num_row_groups)])
    group = np.repeat(np.arange(md.num_row_groups), sizes)
    row = np.arange(md.num_rows) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    keep = np.arange(md.num_rows)
    if wanted is not None:
        keep = np.flatnonzero(np.isin(table.column(SPLIT).to_numpy(zero_copy_only=False), wanted))
    if not len(keep):
        return None
    leaf = _leaf(md, AUDIO) if AUDIO in columns else -1
    offsets = np.array([_pcm_offset(md, g, leaf, width) for g in range(md.num_row_groups)], dtype=np.int64)
    small = numpy_batch(table.select(small_cols).take(keep)) if small_cols else {}
    return {
        "row_group": group[keep].astype(np.int32),
        "row": row[keep].astype(np.int32),
        "offset": offsets[group[keep]],
        "small": small,
        "width": width,
    }


def build_index(
    folder: str | Path, splits: Sequence[str] | None, columns: Sequence[str], threads: int = 4
) -> ShardIndex:
    """The rows of ``splits`` (all rows when None) of the shard folder: the footers and the small columns only
    (``threads`` files at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    files = sorted(str(f) for f in (Path(folder) / DATA_DIR).glob("*.parquet"))
    wanted = None if splits is None else list(splits)
    with ThreadPoolExecutor(threads) as pool:
        per_file = list(pool.map(lambda f: _file_rows(f, wanted, columns), files))
    got = [(k, r) for k, r in enumerate(per_file) if r is not None]
    cat = lambda key, dtype: np.concatenate([r[key] for _, r in got]) if got else np.zeros(0, dtype=dtype)  # noqa: E731
    small_cols = [c for c in columns if c != AUDIO]
    index = ShardIndex(
        tuple(files),
        tuple(columns),
        np.concatenate([np.full(len(r["row"]), k, dtype=np.int32) for k, r in got]) if got else np.zeros(0, np.int32),
        cat("row_group", np.int32),
        cat("row", np.int32),
        cat("offset", np.int64),
        {c: np.concatenate([r["small"][c] for _, r in got]) if got else np.zeros(0) for c in small_cols},
        got[0][1]["width"] if got else SEGMENT_BYTES,
    )
    return _checked(index)


def _checked(index: ShardIndex) -> ShardIndex:
    """Compare the PCM at the first addressable row's offset with pyarrow's read of it; on a mismatch (a Parquet
    writer laying pages out otherwise) no row is read by offset."""
    at = np.flatnonzero(index.offset >= 0)
    if AUDIO not in index.columns or not len(at):
        return index
    i = int(at[0])
    want = from_column(pq.ParquetFile(index.files[index.file[i]]).read_row_group(int(index.row_group[i]), [AUDIO])[0])
    got = np.empty(index.width // DTYPE.itemsize, dtype=DTYPE)
    with open(index.files[index.file[i]], "rb") as f:
        ok = os.preadv(f.fileno(), [got], int(index.offset[i])) == index.width and np.array_equal(got, want[0])
    if ok:
        return index
    logger.warning("%s: the PCM is not where the footer puts it; reading whole row groups", index.files[index.file[i]])
    keep = [getattr(index, k) for k in ("files", "columns", "file", "row_group", "row")]
    return ShardIndex(*keep, np.full(len(index), -1, dtype=np.int64), index.small, index.width)


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
