"""Batch iterators the training loop consumes: equal source/target batches, no batch of 1, labels stacked, a
global seeded shuffle every epoch; which sets are held in the object store."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines.data import plan_materialize


def _table(n: int, labelled: bool = True, offset: int = 0, spread: bool = False) -> pa.Table:
    """Rows in the shard schema (mdlda/pcm.py audio column), 16 samples a segment, every sample = the row id."""
    from mdlda.pcm import to_column, with_metadata

    ids = np.arange(offset, offset + n)
    cols = {"clip_id": [f"c{i}" for i in ids], "audio": to_column(np.repeat(ids[:, None], 16, 1).astype(np.int16))}
    if labelled:
        cols["labels"] = pa.array([[float(1 + i % 10)] * 7 for i in ids], type=pa.list_(pa.float32()))
    if spread:
        cols["teacher_spread"] = pa.array((ids / 10).astype(np.float32))
    return with_metadata(pa.table(cols))


def _ds(n: int, labelled: bool = True, offset: int = 0, **kw):
    import ray

    return ray.data.from_arrow(_table(n, labelled, offset, **kw)).materialize()


def test_materialisation_takes_sets_in_order_while_they_fit_the_share_of_free_memory():
    plan = plan_materialize({"source_train": 600, "source_valid": 100, "target": 400}, free_bytes=2000, share=0.5)
    assert plan["budget_bytes"] == 1000
    assert {k: v["materialized"] for k, v in plan["sets"].items()} == {
        "source_train": True,
        "source_valid": True,
        "target": False,  # 600 + 100 + 400 > 1000: streamed
    }
    assert plan["materialized_bytes"] == 700 and plan["sets"]["target"]["bytes"] == 400
    # the paper-scale source set (~2.9 GB) and a 0.4 GB target subset on a GPU node's 40 GB store: all held
    big = plan_materialize({"source_train": 2.9e9, "source_valid": 0.3e9, "target": 0.4e9}, 40e9, 0.5)
    assert all(v["materialized"] for v in big["sets"].values())
    assert not any(v["materialized"] for v in plan_materialize({"a": 1}, 0, 0.5)["sets"].values())


@pytest.mark.slow
def test_pairs_every_source_batch_with_an_equal_target_batch(ray_local):
    from pipelines.batches import Sampling, train_batches

    batches = list(train_batches(_ds(10), Sampling(4, seed=0), epoch=0, target=_ds(3, labelled=False, offset=100)))
    assert len(batches) == 2  # 10 source rows, batch 4: the partial batch is dropped
    for b in batches:
        assert b["audio"].shape == (4, 16) and b["target_audio"].shape == (4, 16)
        assert b["labels"].shape == (4, 7) and b["labels"].dtype == np.float32
        assert set(b["target_audio"][:, 0]) <= {100, 101, 102}  # a target smaller than a batch is repeated
        assert set(b["audio"][:, 0]) <= set(range(10))


@pytest.mark.slow
def test_epochs_shuffle_differently_and_reproducibly(ray_local):
    from pipelines.batches import Sampling, train_batches

    src = _ds(32)
    order = lambda epoch: [int(x) for b in train_batches(src, Sampling(8, 0), epoch) for x in b["audio"][:, 0]]  # noqa: E731
    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == list(range(32))


@pytest.mark.slow
def test_pseudo_labelled_target_brings_its_labels(ray_local):
    from pipelines.batches import Sampling, train_batches

    b = next(iter(train_batches(_ds(8), Sampling(4, 0), 0, target=_ds(8, offset=50), target_labelled=True)))
    assert b["target_labels"].shape == (4, 7)
    assert np.allclose(b["target_labels"][:, 0], 1 + b["target_audio"][:, 0] % 10)


@pytest.mark.slow
def test_empty_target_is_a_clear_error(ray_local):
    import ray

    from pipelines.batches import Sampling, train_batches

    empty = ray.data.from_arrow(_table(1, labelled=False)).filter(lambda r: False).materialize()
    with pytest.raises(ValueError, match="target set is empty"):
        list(train_batches(_ds(8), Sampling(4, 0), 0, target=empty))


@pytest.mark.slow
def test_pooled_mix_sees_every_segment_once_in_domain_pure_batches(ray_local):
    from pipelines.batches import Sampling, pooled_batches

    src, tgt = _ds(20), _ds(9, offset=100)
    epoch = list(pooled_batches(src, tgt, Sampling(4, seed=3), epoch=0, sizes=(20, 9)))
    source = [b for b in epoch if "audio" in b]
    target = [b for b in epoch if "target_audio" in b]
    assert all(("audio" in b) != ("target_audio" in b) for b in epoch)  # never both domains in one batch
    assert sorted(int(x) for b in source for x in b["audio"][:, 0]) == list(range(20))
    # 9 target rows, batch 4: 4 + 4 + 1, and the 1-row batch is dropped (BatchNorm needs 2)
    assert [len(b["target_audio"]) for b in target] == [4, 4]
    assert all(np.allclose(b["target_labels"][:, 0], 1 + b["target_audio"][:, 0] % 10) for b in target)
    kinds = lambda e: ["s" if "audio" in b else "t" for b in pooled_batches(src, tgt, Sampling(4, 3), e, (20, 9))]  # noqa: E731
    assert kinds(0) == kinds(0) and kinds(0) != kinds(1)  # a seeded interleaving, new every epoch


@pytest.mark.slow
def test_the_teacher_spread_rides_along_with_the_pseudo_labels(ray_local):
    from pipelines.batches import Sampling, pooled_batches, train_batches

    tgt = _ds(8, spread=True)
    paired = next(iter(train_batches(_ds(8), Sampling(4, 0), 0, target=tgt, target_labelled=True)))
    pooled = [b for b in pooled_batches(_ds(8), tgt, Sampling(4, 0), 0, (8, 8)) if "target_audio" in b]
    for b in [paired, *pooled]:
        assert np.allclose(b["target_spread"], b["target_audio"][:, 0] / 10)
    assert "target_spread" not in next(
        iter(train_batches(_ds(8), Sampling(4, 0), 0, target=_ds(8), target_labelled=True))
    )


def _epoch(ds, epoch: int, global_shuffle: bool = True) -> list[int]:
    from pipelines.batches import Sampling, train_batches

    batches = train_batches(ds, Sampling(8, 0, shuffle_buffer=4, global_shuffle=global_shuffle), epoch)
    return [int(x) for b in batches for x in b["audio"][:, 0]]


def _block_spread(order: list[int], block: int = 8) -> float:
    """Median over groups of ``block`` rows adjacent in storage of how far apart the epoch puts them."""
    pos = {row: i for i, row in enumerate(order)}
    return float(np.median([np.ptp([pos[r] for r in range(s, s + block)]) for s in range(0, len(order), block)]))


@pytest.mark.slow
def test_the_source_is_shuffled_globally_each_epoch_from_memory_and_from_shards(ray_local, tmp_path):
    """120 rows, batches of 8, a 4-row local buffer: a global shuffle scatters rows that sit together in storage
    over the whole epoch (median spread ~90 positions); block order + local buffer keeps them within ~20."""
    import pyarrow.parquet as pq
    import ray

    from pipelines.data import _materialize
    from pipelines.shards import WRITE_OPTIONS

    for k in range(3):  # a lazy dataset over real shard files: Ray Data's seeded random_shuffle
        pq.write_table(_table(40, offset=40 * k), tmp_path / f"part-{k}.parquet", **WRITE_OPTIONS)
    streamed = ray.data.read_parquet(str(tmp_path))
    in_memory = _materialize(ray.data.from_arrow(_table(120)), rows_per_block=1)  # one-row blocks, random order
    assert in_memory.num_blocks() == 120
    for ds in (in_memory, streamed):
        first = _epoch(ds, 0)
        assert sorted(first) == list(range(120))  # every row once
        assert first == _epoch(ds, 0) and first != _epoch(ds, 1)  # seeded, new every epoch
        assert _block_spread(first) > 60
    local = _epoch(_materialize(ray.data.from_arrow(_table(120)), rows_per_block=8), 0, global_shuffle=False)
    assert sorted(local) == list(range(120)) and _block_spread(local) < 30


@pytest.mark.slow
def test_stage_data_holds_what_fits_in_the_object_store_and_says_so(midlevel_shards, caplog):
    from pipelines.data import load_stage_data

    with caplog.at_level("INFO", logger="pipelines.data"):
        held = load_stage_data(midlevel_shards.out, materialize_share=1.0)
    assert held.materialized and held.source_train.num_blocks() == held.counts["source_train"]  # one-row blocks
    assert held.memory["object_store_free_bytes"] > 0
    assert held.memory["sets"]["source_train"]["bytes"] >= held.counts["source_train"] * 661_500
    assert "source_train" in caplog.text and "materialized" in caplog.text and "GB free" in caplog.text
    streamed = load_stage_data(midlevel_shards.out, materialize_share=0.0)
    assert not streamed.materialized
    assert not isinstance(streamed.source_train, type(held.source_train))  # lazy: read from the shards each epoch
    b = next(iter(streamed.source_train.iter_batches(batch_size=2, batch_format="pyarrow")))
    assert b.schema.field("audio").type.byte_width == 661_500


def _shard_files(folder, n: int, offset: int = 0, per_file: int = 20, labelled: bool = True, **options):
    """``n`` rows in shard files of ``per_file`` rows (one row per row group: prepare's layout, WRITE_OPTIONS)."""
    import pyarrow.parquet as pq

    from pipelines.shards import WRITE_OPTIONS

    folder.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(offset, offset + n, per_file)):
        t = _table(min(per_file, offset + n - start), labelled=labelled, offset=start)
        t = t.append_column("split", pa.array(["train"] * len(t)))
        pq.write_table(t, folder / f"part-{k:03d}.parquet", **{**WRITE_OPTIONS, **options})
    return folder


def _streamed(folder, columns=("clip_id", "audio", "labels")):
    """A Dataset over shard files with its row index, as load_stage_data streams a set that does not fit."""
    import ray

    from pipelines.shard_dataset import _attach_index
    from pipelines.shard_index import ShardIndex, build_index

    index = build_index(folder.parent, ["train"], list(columns)) if folder.name == "data" else None
    assert isinstance(index, ShardIndex)
    return _attach_index(ray.data.read_parquet(str(folder)).select_columns(list(columns)), index)


@pytest.mark.slow
def test_streamed_shards_are_permuted_globally_each_epoch_without_ray_datas_shuffle(ray_local, tmp_path, monkeypatch):
    """120 rows in 6 files: every epoch reads each row once, in a seeded order new every epoch, with the rows of a
    file scattered over the whole epoch; Ray Data's random_shuffle is never run, and the index survives pickling
    (a Tune trial receives the Dataset that way)."""
    import ray
    from ray import cloudpickle as pickle  # what Ray pickles with (tune.with_parameters, ray.put)

    from pipelines.batches import Sampling, train_batches
    from pipelines.shard_dataset import _shard_index

    ds = _streamed(_shard_files(tmp_path / "data", 120))
    monkeypatch.setattr(ray.data.Dataset, "random_shuffle", lambda *a, **k: pytest.fail("random_shuffle ran"))
    first = _epoch(ds, 0)
    assert sorted(first) == list(range(120))  # every row once (120 = 15 batches of 8)
    assert first == _epoch(ds, 0) and first != _epoch(ds, 1)  # seeded, new every epoch
    assert _block_spread(first, block=20) > 90  # a file's 20 rows spread over most of the 120 places
    again = pickle.loads(pickle.dumps(ds))
    assert len(_shard_index(again)) == 120 and _epoch(again, 0) == first
    in_a_task = ray.remote(  # a Ray worker gets the Dataset, index and all, as a Tune trial does
        lambda d: [int(x) for b in train_batches(d, Sampling(8, 0, shuffle_buffer=4), 0) for x in b["audio"][:, 0]]
    )
    assert ray.get(in_a_task.remote(ds)) == first
    assert sorted(r["clip_id"] for r in again.take_all()) == sorted(f"c{i}" for i in range(120))  # still a Dataset


@pytest.mark.slow
def test_the_target_is_a_seeded_subset_of_the_source_size_per_run(ray_local, tmp_path):
    """Teachers pair the 40 source rows with 40 of the 200 target rows: the same 40 every epoch of a run, others
    for another run seed, streamed (row index) or held in memory (one-row blocks)."""
    import ray

    from pipelines.batches import Sampling, train_batches
    from pipelines.data import _materialize

    src = _ds(40)
    streamed = _streamed(_shard_files(tmp_path / "data", 200, offset=1000, labelled=False), ("clip_id", "audio"))
    held = _materialize(ray.data.from_arrow(_table(200, labelled=False, offset=1000)), rows_per_block=1)
    for tgt in (streamed, held):

        def seen(seed: int, epoch: int, tgt=tgt) -> list[int]:
            return [
                int(x)
                for b in train_batches(src, Sampling(8, seed), epoch, target=tgt)
                for x in b["target_audio"][:, 0]
            ]

        run = seen(1, 0)
        assert len(run) == 40 and len(set(run)) == 40  # a subset of the source's size, each row once per epoch
        assert set(seen(1, 1)) == set(run) and seen(1, 1) != run  # the run's subset, in a new order each epoch
        assert seen(1, 0) == run  # seeded
        other = set(seen(2, 0))
        assert len(other) == 40 and other != set(run)  # another run seed, another subset
        assert set(run) <= set(range(1000, 1200)) and set(run) != set(range(1000, 1040))  # not the first rows


@pytest.mark.slow
def test_stage_data_streams_exactly_each_split_from_the_footers(midlevel_shards):
    """load_stage_data with nothing held in memory: the streamed sets' row indexes and read_shards' Datasets hold
    exactly each split's rows, as the files say and as the manifest counts them."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from mdlda.manifest import DATA_DIR
    from mdlda.pcm import from_column
    from pipelines.batches import Sampling, train_batches, valid_batches
    from pipelines.data import load_stage_data
    from pipelines.shard_dataset import _shard_index
    from pipelines.shards import read_shards

    rows = pq.read_table(Path(midlevel_shards.out) / DATA_DIR, columns=["clip_id", "split"]).to_pydict()
    pairs = list(zip(rows["clip_id"], rows["split"], strict=True))
    truth = {s: sorted(c for c, t in pairs if t == s) for s in ("train", "valid")}
    data = load_stage_data(midlevel_shards.out, materialize_share=0.0)
    assert len(_shard_index(data.source_train)) == data.counts["source_train"] == len(truth["train"])
    assert len(_shard_index(data.source_valid)) == data.counts["source_valid"] == len(truth["valid"])
    assert _shard_index(data.source_train).addressable  # prepare's layout: each segment read at its offset
    first = next(iter(_iter_all(data.source_train)))
    for clip, pcm in zip(first["clip_id"], first["audio"], strict=True):  # the bytes pyarrow reads for that row
        t = pq.read_table(Path(midlevel_shards.out) / DATA_DIR, columns=["audio"], filters=[("clip_id", "=", clip)])
        assert np.array_equal(from_column(t.column("audio"))[0], pcm)
    ids = lambda batches: sorted(str(c) for b in batches for c in b["clip_id"])  # noqa: E731
    assert ids(_iter_all(data.source_train)) == truth["train"]
    assert ids(_iter_all(data.source_valid)) == truth["valid"]
    assert sum(len(b["audio"]) for b in valid_batches(data.source_valid, 4)) == len(truth["valid"])
    n = len(truth["train"]) // 4 * 4  # the last partial batch dropped
    assert sum(len(b["audio"]) for b in train_batches(data.source_train, Sampling(4, 0), 0)) == n
    for split in ("train", "valid"):  # the Ray Data path (Ray Train, evaluation): the same rows
        ds, _ = read_shards(midlevel_shards.out, splits=[split], columns=["clip_id"])
        assert sorted(r["clip_id"] for r in ds.take_all()) == truth[split]


def _iter_all(ds):
    from pipelines.batches import _iter

    return _iter(ds, 4, 0, 0, drop_last=False)
