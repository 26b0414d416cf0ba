"""The row index of a streamed shard set: which rows of which files a split holds, and where each row's PCM lies,
from the Parquet footers and the small columns only (no audio read). :mod:`pipelines.shard_reader` reads an
epoch's rows from it.

Why an index: a set that does not fit in the object store is read every epoch. Through Ray Data that meant a read
task per file, the split selected by a filter that copies every selected segment, every block copied into the
object store and again into batches, and (for a global shuffle) all bytes through ``random_shuffle``'s map and
reduce tasks, plus Ray Data's start-up every epoch (bench/datapath.py measures it; figures in bench/README.md).
Built once at the stage start, the index makes a split selection, a seeded permutation and a seeded subset plain
array operations.

:func:`build_index` (:class:`ShardIndex`): one entry per selected row, from each file's footer and its small
columns (``split``, ``clip_id``, ``labels``, ...: a few bytes per row, read once and kept in the index). Prepare
writes one row per row group (``WRITE_OPTIONS`` in pipelines/shards.py) and the audio column uncompressed: a row
group's audio chunk is then one page whose last ``SEGMENT_BYTES`` bytes are the segment's PCM, so the footer gives
each segment's byte offset (:attr:`ShardIndex.offset`; -1 for shards written before that layout).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
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
