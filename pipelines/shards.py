"""Reading shard folders back as Ray Datasets, after checking their manifests."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from mdlda.manifest import DATA_DIR, ShardError, read_manifest
from mdlda.pcm import check_schema, numpy_batch


def read_shards(
    folder: str | Path,
    splits: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    files: Sequence[str] | None = None,
) -> tuple[ray.data.Dataset, dict]:
    """A lazy Ray Dataset over a finished shard folder, optionally only some splits and columns, and only the data
    ``files`` given (paths of the folder's files; e.g. those holding the rows one wants, from :func:`local_index`).

    Refuses (``ShardError`` / ``AudioParamsMismatch``) a folder without a manifest, one made with other audio
    parameters, or a request for a split the folder does not have.
    """
    folder = Path(folder).resolve()
    manifest = _checked_folder(folder, splits)
    only = None if files is None else {str(Path(f).resolve()) for f in files}
    if only is not None:
        if not only:
            raise ShardError(f"{folder}: no data file to read (an empty file list)")
        foreign = sorted(f for f in only if Path(f).parent != folder / DATA_DIR)
        if foreign:
            raise ShardError(f"{folder}: {foreign[0]} is not one of this folder's data files")
    if splits is None:
        ds = ray.data.read_parquet(sorted(only) if only is not None else str(folder / DATA_DIR))
    else:
        ds = _read_splits(folder, list(splits), only)
    if columns is not None:
        ds = ds.select_columns(list(columns))
    return ds, manifest


def local_index(folder: str | Path, splits: Sequence[str] | None = None, columns: Sequence[str] | None = None):
    """The :class:`~pipelines.shard_index.ShardIndex` of the rows of ``splits`` (every column when ``columns`` is
    None), after the same checks as :func:`read_shards`: footers and small columns only, no audio read. Take or
    sample its rows, then read them in this process with :func:`local_batches` or :func:`local_rows`."""
    from pipelines.shard_index import build_index

    folder = Path(folder).resolve()
    _checked_folder(folder, splits)
    if columns is None:
        files = sorted((folder / DATA_DIR).glob("*.parquet"))
        columns = pq.read_schema(files[0]).names if files else []
    return build_index(folder, splits, list(columns))


def local_batches(
    folder: str | Path,
    splits: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    batch_size: int = 256,
    index=None,
) -> Iterator[dict[str, np.ndarray]]:
    """The rows of ``splits`` of a finished shard folder (or of ``index``, from :func:`local_index`) in storage
    order, read in this process without Ray, as :func:`numpy_batches` gives them; the folder is checked as
    :func:`read_shards` checks it, before the first batch.

    For what one process consumes whole or in one pass: the evaluation splits, the BatchNorm samples, the probe's
    segments, an OOD pass. A Ray Data read costs from half a second to seconds of executor start whatever its size
    (bench/README.md, parquet_read.py), more than reading such a set; sets for training go through
    :func:`read_shards` (materialised, or a row index that the trials read)."""
    from pipelines.shard_reader import epoch_batches

    index = index if index is not None else local_index(folder, splits, columns)
    return epoch_batches(index, batch_size, seed=None)


def local_rows(
    folder: str | Path, splits: Sequence[str] | None = None, columns: Sequence[str] | None = None, index=None
) -> dict[str, np.ndarray]:
    """Every row of ``splits`` (or of ``index``) in memory, column by column (:func:`local_batches`); {} when
    there are none."""
    parts = list(local_batches(folder, splits, columns, index=index))
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _checked_folder(folder: Path, splits: Sequence[str] | None) -> dict:
    manifest = read_manifest(folder)
    if splits is not None:
        unknown = sorted(set(splits) - set(manifest["counts"]))
        if unknown:
            raise ShardError(f"{folder}: no rows in split(s) {unknown}; it has {sorted(manifest['counts'])}")
    check_files_layout(folder)
    return manifest


def split_files(folder: Path, splits: Sequence[str]) -> tuple[list[str], list[str]]:
    """(files holding only rows of ``splits``, files mixing them with other splits), from the ``split`` column's
    statistics in each file's footer (no data read); files without a row of ``splits`` are in neither."""
    pure, mixed = [], []
    wanted = set(splits)
    for f in sorted((folder / DATA_DIR).glob("*.parquet")):
        md = pq.read_metadata(f)
        idx = next((i for i in range(md.num_columns) if md.schema.column(i).path == "split"), -1)
        seen: set[str] = set()
        for g in range(md.num_row_groups):
            stats = md.row_group(g).column(idx).statistics if idx >= 0 else None
            if stats is None or not stats.has_min_max or stats.min != stats.max:
                seen = {"?"}  # unknown or several splits in one row group
                break
            seen.add(stats.min.decode() if isinstance(stats.min, bytes) else str(stats.min))
        if seen and seen <= wanted:
            pure.append(str(f))
        elif seen & wanted or "?" in seen:
            mixed.append(str(f))
    return pure, mixed


def _read_splits(folder: Path, splits: list[str], only: set[str] | None = None) -> ray.data.Dataset:
    """The rows of ``splits`` (in the files of ``only`` when given): the files holding only those splits are read as
    they are (MAESTRO's files hold one performance, so one split), and only files mixing splits go through the row
    filter (which copies the rows it keeps)."""
    pure, mixed = split_files(folder, splits)
    if only is not None:
        pure = [f for f in pure if str(Path(f).resolve()) in only]
        mixed = [f for f in mixed if str(Path(f).resolve()) in only]
    parts = []
    if pure:
        parts.append(ray.data.read_parquet(pure))
    if mixed:
        parts.append(ray.data.read_parquet(mixed).filter(expr=col("split").is_in(splits)))
    if not parts:  # the manifest counts rows of these splits, but no file holds one: an empty Dataset
        every = sorted(only) if only else str(folder / DATA_DIR)
        return ray.data.read_parquet(every).filter(expr=col("split").is_in(splits))
    return parts[0] if len(parts) == 1 else parts[0].union(parts[1])


# Parquet options of every shard writer. The audio column is raw int16 PCM in a fixed-size binary column
# (mdlda/pcm.py), written uncompressed: PCM hardly compresses and every codec costs CPU on each read
# (bench/parquet_write.py measures both; bench/README.md has the figures). Only the
# short strings are dictionary-encoded and carry statistics (what the split selection uses); min/max statistics
# of 661,500-byte values would cost a pass over them and bloat the footer. One row per row group: a row group is
# the unit a Parquet reader reads, so a seeded permutation of row groups is a permutation of the segments (the
# global shuffle of streamed sets) and a seeded subset reads only its own rows (pipelines/shard_reader.py); the
# footer grows by ~1-2 KB per 661,500-byte segment.
_STRINGS = ["clip_id", "dataset", "domain", "split", "group"]
WRITE_OPTIONS = {
    "use_dictionary": _STRINGS,
    "compression": "none",
    "write_statistics": _STRINGS,
    "row_group_size": 1,
}


def labels_array(labels: np.ndarray) -> pa.ListArray:
    """(B, 7) float labels -> the shard schema's labels column (list<float32> of 7 per row)."""
    labels = np.ascontiguousarray(labels, dtype=np.float32)
    n, k = labels.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(labels.reshape(-1)))


def numpy_batches(ds, batch_size: int = 256) -> Iterator[dict[str, np.ndarray]]:
    """A shard Dataset's rows in storage order as numpy batches: ``audio`` ``(B, N)`` int16 viewed from the PCM
    bytes, ``labels`` ``(B, 7)`` float32 (:func:`mdlda.pcm.numpy_batch`)."""
    for table in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        yield numpy_batch(table)


def check_files_layout(folder: Path) -> None:
    """Refuse a folder whose Parquet files hold audio in another layout than this code's (the first file's schema:
    prepare writes every file of a folder with one layout; a rebuild replaces them all)."""
    files = sorted((folder / DATA_DIR).glob("*.parquet"))
    if files:
        check_schema(pq.read_schema(files[0]), str(files[0]))


def split_count(manifest: dict, splits: Sequence[str] | None = None) -> int:
    """Rows in the given splits according to the manifest (no data read)."""
    counts = manifest["counts"]
    return int(sum(v for k, v in counts.items() if splits is None or k in splits))
