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
