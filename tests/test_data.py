"""Batch iterators the training loop consumes: equal source/target batches, no batch of 1, labels stacked."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _ds(n: int, labelled: bool = True, offset: int = 0):
    import ray

    rows = []
    for i in range(n):
        row = {"clip_id": f"c{offset + i}", "audio": np.full(16, offset + i, dtype=np.int16)}
        if labelled:
            row["labels"] = [float(1 + (offset + i) % 10)] * 7
        rows.append(row)
    return ray.data.from_items(rows).materialize()


def test_pairs_every_source_batch_with_an_equal_target_batch(ray_local):
    from pipelines.data import train_batches

    batches = list(train_batches(_ds(10), 4, seed=0, epoch=0, target=_ds(3, labelled=False, offset=100)))
    assert len(batches) == 2  # 10 source rows, batch 4: the partial batch is dropped
    for b in batches:
        assert b["audio"].shape == (4, 16) and b["target_audio"].shape == (4, 16)
        assert b["labels"].shape == (4, 7) and b["labels"].dtype == np.float32
        assert set(b["target_audio"][:, 0]) <= {100, 101, 102}  # a target smaller than a batch is repeated
        assert set(b["audio"][:, 0]) <= set(range(10))


def test_epochs_shuffle_differently_and_reproducibly(ray_local):
    from pipelines.data import train_batches

    src = _ds(32)
    order = lambda epoch: [int(x) for b in train_batches(src, 8, 0, epoch) for x in b["audio"][:, 0]]  # noqa: E731
    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == list(range(32))


def test_pseudo_labelled_target_brings_its_labels(ray_local):
    from pipelines.data import train_batches

    b = next(iter(train_batches(_ds(8), 4, 0, 0, target=_ds(8, offset=50), target_labelled=True)))
    assert b["target_labels"].shape == (4, 7)
    assert np.allclose(b["target_labels"][:, 0], 1 + b["target_audio"][:, 0] % 10)


def test_empty_target_is_a_clear_error(ray_local):
    import ray

    from pipelines.data import train_batches

    empty = (
        ray.data.from_items([{"clip_id": "x", "audio": np.zeros(16, np.int16)}]).filter(lambda r: False).materialize()
    )
    with pytest.raises(ValueError, match="target set is empty"):
        list(train_batches(_ds(8), 4, 0, 0, target=empty))


def test_pooled_mix_sees_every_segment_once_in_domain_pure_batches(ray_local):
    from pipelines.data import pooled_batches

    src, tgt = _ds(20), _ds(9, offset=100)
    epoch = list(pooled_batches(src, tgt, 4, seed=3, epoch=0, sizes=(20, 9)))
    source = [b for b in epoch if "audio" in b]
    target = [b for b in epoch if "target_audio" in b]
    assert all(("audio" in b) != ("target_audio" in b) for b in epoch)  # never both domains in one batch
    assert sorted(int(x) for b in source for x in b["audio"][:, 0]) == list(range(20))
    # 9 target rows, batch 4: 4 + 4 + 1, and the 1-row batch is dropped (BatchNorm needs 2)
    assert [len(b["target_audio"]) for b in target] == [4, 4]
    assert all(np.allclose(b["target_labels"][:, 0], 1 + b["target_audio"][:, 0] % 10) for b in target)
    kinds = lambda e: ["s" if "audio" in b else "t" for b in pooled_batches(src, tgt, 4, 3, e, (20, 9))]  # noqa: E731
    assert kinds(0) == kinds(0) and kinds(0) != kinds(1)  # a seeded interleaving, new every epoch


def test_the_teacher_spread_rides_along_with_the_pseudo_labels(ray_local):
    import ray

    from pipelines.data import pooled_batches, train_batches

    rows = [
        {"clip_id": f"t{i}", "audio": np.full(16, i, np.int16), "labels": [5.0] * 7, "teacher_spread": i / 10}
        for i in range(8)
    ]
    tgt = ray.data.from_items(rows).materialize()
    paired = next(iter(train_batches(_ds(8), 4, 0, 0, target=tgt, target_labelled=True)))
    pooled = [b for b in pooled_batches(_ds(8), tgt, 4, 0, 0, (8, 8)) if "target_audio" in b]
    for b in [paired, *pooled]:
        assert np.allclose(b["target_spread"], b["target_audio"][:, 0] / 10)
    assert "target_spread" not in next(iter(train_batches(_ds(8), 4, 0, 0, target=_ds(8), target_labelled=True)))
