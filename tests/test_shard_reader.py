"""The streamed sets' reader (pipelines/shard_reader.py), on real Parquet shard files, without Ray: the split chosen
from the footers, a seeded permutation of the rows new every epoch, a seeded subset that reads only its rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mdlda.manifest import DATA_DIR
from pipelines.shard_index import build_index
from pipelines.shard_reader import epoch_batches
from pipelines.shards import WRITE_OPTIONS

SPLITS = ("train", "valid", "test")


def _table(ids: np.ndarray, splits: list[str]) -> pa.Table:
    """Rows in the shard schema, 16 samples a segment, every sample = the row id."""
    from mdlda.pcm import to_column, with_metadata

    return with_metadata(
        pa.table(
            {
                "clip_id": [f"c{i}" for i in ids],
                "split": splits,
                "audio": to_column(np.repeat(ids[:, None], 16, 1).astype(np.int16)),
                "labels": pa.array([[float(1 + i % 10)] * 7 for i in ids], type=pa.list_(pa.float32())),
            }
        )
    )


def _shards(folder: Path, n_files: int = 6, per_file: int = 20, **options) -> dict[str, set[int]]:
    """Files mixing the three splits row by row (as Mid-level's do), plus one train-only file; returns the ids
    of each split."""
    (folder / DATA_DIR).mkdir(parents=True)
    truth: dict[str, set[int]] = {s: set() for s in SPLITS}
    for k in range(n_files):
        ids = np.arange(k * per_file, (k + 1) * per_file)
        splits = [SPLITS[i % 3] if k < n_files - 1 else "train" for i in ids]
        for i, s in zip(ids, splits, strict=True):
            truth[s].add(int(i))
        pq.write_table(_table(ids, splits), folder / DATA_DIR / f"part-{k:03d}.parquet", **{**WRITE_OPTIONS, **options})
    return truth


def _ids(batches) -> list[int]:
    return [int(x) for b in batches for x in b["audio"][:, 0]]


def test_the_split_is_selected_from_the_footers_exactly(tmp_path):
    truth = _shards(tmp_path)
    for split in SPLITS:
        index = build_index(tmp_path, [split], ["clip_id", "audio", "labels"])
        assert sorted(_ids(epoch_batches(index, 7, seed=None))) == sorted(truth[split])
    both = build_index(tmp_path, ["valid", "test"], ["audio"])
    assert sorted(_ids(epoch_batches(both, 5, None))) == sorted(truth["valid"] | truth["test"])
    assert len(build_index(tmp_path, None, ["audio"])) == 120


def test_an_epoch_is_a_seeded_uniform_permutation_new_every_epoch(tmp_path):
    _shards(tmp_path)
    index = build_index(tmp_path, ["train"], ["clip_id", "audio", "labels"])
    assert index.addressable  # prepare's layout: one row per row group, each segment read at its offset
    epoch = lambda seed: _ids(epoch_batches(index, 8, seed, drop_last=False))  # noqa: E731
    first = epoch(11)
    assert sorted(first) == sorted(set(first)) and len(first) == len(index)  # every row once
    assert first == epoch(11) and first != epoch(12)  # seeded, new every epoch
    # global: the rows of one file (adjacent in storage) end up all over the epoch, not in a run
    storage = _ids(epoch_batches(index, 8, None))
    pos = {r: i for i, r in enumerate(first)}
    spread = [np.ptp([pos[r] for r in storage[s : s + 8]]) for s in range(0, len(storage) - 7, 8)]
    assert np.median(spread) > len(first) / 2
    # every row is equally likely at every place: row 0's position over many seeds is spread uniformly
    where = [epoch(s).index(storage[0]) for s in range(200)]
    assert abs(np.mean(where) - (len(first) - 1) / 2) < len(first) / 8
    assert len(set(where)) > len(first) / 2


def test_batches_are_numpy_with_labels_and_the_last_partial_one_dropped_on_request(tmp_path):
    _shards(tmp_path)
    index = build_index(tmp_path, ["train"], ["clip_id", "audio", "labels"])
    batches = list(epoch_batches(index, 16, seed=0, drop_last=True))
    assert [len(b["audio"]) for b in batches] == [16] * (len(index) // 16)
    b = batches[0]
    assert b["audio"].dtype == np.int16 and b["audio"].shape == (16, 16)
    assert b["labels"].shape == (16, 7) and b["labels"].dtype == np.float32
    assert np.allclose(b["labels"][:, 0], 1 + b["audio"][:, 0] % 10)
    assert [f"c{i}" for i in b["audio"][:, 0]] == list(b["clip_id"])
    assert sum(len(b["audio"]) for b in epoch_batches(index, 16, 0, drop_last=False)) == len(index)


def test_a_seeded_subset_has_its_size_differs_per_seed_and_reads_only_its_rows(tmp_path, monkeypatch):
    from pipelines import shard_reader

    _shards(tmp_path)
    index = build_index(tmp_path, ["train"], ["audio"])
    a, b = index.sample(10, seed=1), index.sample(10, seed=2)
    assert len(a) == 10 and a.row_group.tolist() == index.sample(10, seed=1).row_group.tolist()
    assert set(zip(a.file, a.row_group, strict=True)) != set(zip(b.file, b.row_group, strict=True))
    assert index.sample(10_000, seed=1) is index  # fewer rows than asked: all of them
    read: list[int] = []
    real = shard_reader.os.preadv
    monkeypatch.setattr(shard_reader.os, "preadv", lambda fd, bufs, at: read.append(at) or real(fd, bufs, at))
    got = _ids(epoch_batches(a, 4, seed=5))
    assert len(got) == 10 and len(set(got)) == 10
    assert sorted(read) == sorted(a.offset.tolist())  # the drawn rows' PCM, nothing else


def test_older_shards_with_many_rows_per_row_group_are_mixed_across_the_buffer(tmp_path):
    truth = _shards(tmp_path, row_group_size=20)  # one row group per file, as before this layout
    index = build_index(tmp_path, ["train"], ["audio"])
    assert not index.addressable
    first = _ids(epoch_batches(index, 4, seed=3, buffer=16))
    assert sorted(first) == sorted(truth["train"])
    assert first == _ids(epoch_batches(index, 4, seed=3, buffer=16))
    assert first != _ids(epoch_batches(index, 4, seed=4, buffer=16))


def test_stopping_early_ends_the_reading_thread(tmp_path):
    import threading

    _shards(tmp_path)
    index = build_index(tmp_path, None, ["audio"])
    before = threading.active_count()
    it = epoch_batches(index, 2, seed=0, prefetch=2)
    next(it)
    it.close()
    assert threading.active_count() == before


@pytest.mark.parametrize("splits", [["train"], ["valid", "test"]])
def test_read_shards_selects_the_split_from_the_footers(tmp_path, splits):
    from pipelines.shards import split_files

    _shards(tmp_path)
    pure, mixed = split_files(tmp_path, splits)
    assert len(pure) == (1 if splits == ["train"] else 0)  # the train-only file needs no row filter
    assert len(mixed) == 5
