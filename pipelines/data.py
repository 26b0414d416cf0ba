"""The datasets a training stage reads, and the batch iterators the shared training loop consumes.

Source (labelled Mid-level) and target (MAESTRO) segments stream from the Parquet shards through Ray Data.
Small datasets are materialized once in the object store (a sweep of many trials then never re-reads Parquet);
every batch iterator pairs each labelled source batch with an equal-sized target batch for DANN/distillation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from mdlda.params import SEGMENT_SAMPLES
from pipelines.shards import read_shards, split_count

SEGMENT_BYTES = SEGMENT_SAMPLES * 2 + 64
TRAIN_COLUMNS = ["clip_id", "audio", "labels"]
SPREAD = "teacher_spread"


@dataclass
class StageData:
    """Datasets of one training stage plus the manifests they came from (logged with every run)."""

    source_train: ray.data.Dataset
    source_valid: ray.data.Dataset
    target: ray.data.Dataset | None
    counts: dict[str, int]
    manifests: dict[str, dict] = field(default_factory=dict)
    materialized: bool = False


def _maybe_materialize(ds: ray.data.Dataset, rows: int, max_gb: float) -> tuple[ray.data.Dataset, bool]:
    if rows * SEGMENT_BYTES <= max_gb * 1e9:
        return ds.materialize(), True
    return ds, False


def load_stage_data(
    source_shards: str | Path,
    target_shards: str | Path | None = None,
    target_splits: list[str] | None = None,
    target_labelled: bool = False,
    materialize_max_gb: float = 2.0,
) -> StageData:
    """Source train/valid from the Mid-level shards; target segments (MAESTRO, or pseudo-labelled shards)."""
    src, src_manifest = read_shards(source_shards, splits=["train"], columns=TRAIN_COLUMNS)
    val, _ = read_shards(source_shards, splits=["valid"], columns=TRAIN_COLUMNS)
    counts = {
        "source_train": split_count(src_manifest, ["train"]),
        "source_valid": split_count(src_manifest, ["valid"]),
    }
    manifests = {"source": src_manifest}
    src, m1 = _maybe_materialize(src, counts["source_train"], materialize_max_gb)
    val, m2 = _maybe_materialize(val, counts["source_valid"], materialize_max_gb)
    tgt = None
    if target_shards is not None:
        cols = TRAIN_COLUMNS if target_labelled else ["clip_id", "audio"]
        if target_labelled and _has_spread(target_shards):
            cols = [*cols, SPREAD]  # pseudo-labels: the teachers' disagreement per segment (StudentConfig.weighting)
        tgt, tgt_manifest = read_shards(target_shards, splits=target_splits, columns=cols)
        counts["target"] = split_count(tgt_manifest, target_splits)
        manifests["target"] = tgt_manifest
        tgt, m3 = _maybe_materialize(tgt, counts["target"], materialize_max_gb)
    else:
        m3 = True
    for name, n in counts.items():
        if n == 0:
            raise ValueError(f"{name} is empty: nothing to train or validate on (check the shard manifests)")
    return StageData(src, val, tgt, counts, manifests, materialized=m1 and m2 and m3)


def _has_spread(shards: str | Path) -> bool:
    from mdlda.manifest import read_manifest

    return SPREAD in read_manifest(shards).get("options", {})


def _target_part(t: dict) -> dict:
    """The pseudo-labelled part of a batch: ``target_audio``, ``target_labels`` (+ ``target_spread``)."""
    out = {"target_audio": t["audio"], "target_labels": t["labels"]}
    if SPREAD in t:
        out["target_spread"] = np.asarray(t[SPREAD], dtype=np.float32)
    return out


def _labels(x: np.ndarray) -> np.ndarray:
    """Fixed-size-list labels arrive as an object array of (7,) arrays: stack them to (B, 7) float32."""
    return np.stack(x).astype(np.float32) if x.dtype == object else np.asarray(x, dtype=np.float32)


def _iter(ds, batch_size: int, seed: int | None, shuffle_buffer: int, drop_last: bool) -> Iterator[dict]:
    """Numpy batches of a Dataset or a Ray Train DataIterator (same API), labels as (B, 7) float32.

    With a seed, a Dataset's blocks are read in a seeded random order and rows pass a local shuffle buffer, so
    every pass starts somewhere else in the data (not at the first rows of storage every epoch)."""
    kwargs = {}
    if seed is not None and shuffle_buffer > 0:
        kwargs = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed}
    if seed is not None and isinstance(ds, ray.data.Dataset):
        ds = ds.randomize_block_order(seed=seed % 2**32)
    for b in ds.iter_batches(
        batch_size=batch_size, batch_format="numpy", drop_last=drop_last, prefetch_batches=4, **kwargs
    ):
        if "labels" in b:
            b["labels"] = _labels(b["labels"])
        yield b


def _cycle(ds, batch_size: int, seed: int, shuffle_buffer: int) -> Iterator[dict]:
    """Endless batches of exactly ``batch_size`` rows, reshuffled every pass; a set smaller than one batch is
    repeated to fill it."""
    round_, pending = 0, []
    while True:
        got = 0
        for b in _iter(ds, batch_size, seed * 1000 + round_, shuffle_buffer, drop_last=False):
            got += len(b["audio"])
            pending.append(b)
            n = sum(len(p["audio"]) for p in pending)
            if n >= batch_size:
                merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
                yield {k: v[:batch_size] for k, v in merged.items()}
                rest = {k: v[batch_size:] for k, v in merged.items()}
                pending = [rest] if len(rest["audio"]) else []
        if got == 0:
            raise ValueError("the target set is empty: nothing to pair with the source batches")
        round_ += 1


def train_batches(
    source: ray.data.Dataset,
    batch_size: int,
    seed: int,
    epoch: int,
    target: ray.data.Dataset | None = None,
    target_labelled: bool = False,
    shuffle_buffer: int = 64,
) -> Iterator[dict]:
    """One epoch of training batches: ``{"audio", "labels"}`` plus, with a target set, an equal number of
    ``"target_audio"`` (and ``"target_labels"``, ``"target_spread"`` when the target is pseudo-labelled). The
    source decides the epoch length (last partial batch dropped, so BatchNorm never sees a batch of 1); the
    target cycles."""
    tgt = _cycle(target, batch_size, seed + 7919 * (epoch + 1), shuffle_buffer) if target is not None else None
    for b in _iter(source, batch_size, seed + 104_729 * (epoch + 1), shuffle_buffer, drop_last=True):
        out = {"audio": b["audio"], "labels": b["labels"]}
        if tgt is not None:
            t = next(tgt)
            out.update(_target_part(t) if target_labelled else {"target_audio": t["audio"]})
        yield out


def valid_batches(ds: ray.data.Dataset, batch_size: int = 16) -> Iterator[dict]:
    for b in _iter(ds, batch_size, None, 0, drop_last=False):
        yield {"audio": b["audio"], "labels": b["labels"]}


def frontend_stats(
    source_shards: str | Path,
    ds: ray.data.Dataset,
    cache_dir: str | Path,
    batch_size: int = 16,
    band_floor: float = 0.1,
) -> tuple[list[float], list[float]]:
    """Per-band mean/std of the training set's spectrograms, cached by the shards' content digest.

    A band whose std is below ``band_floor`` x the median band std (almost no energy over the whole training set,
    e.g. above the cut-off of the MP3 codec the labelled clips were stored with) gets std 1: centred, but not blown
    up. Without that, an uncompressed target recording (a MAESTRO WAV) has energy there that the std of ~0.001
    turns into values of 10-300 standard deviations, and the model's outputs leave the rating scale.
    """
    from mdlda.frontend import Frontend, floored_std, standardization_stats
    from mdlda.manifest import read_manifest

    digest = read_manifest(source_shards)["content_digest"]
    cache = Path(cache_dir) / f"frontend-stats-{digest[:16]}-floor{band_floor:g}.json"
    if cache.exists():
        d = json.loads(cache.read_text())
        return d["mean"], d["std"]
    frontend = Frontend()
    mean, std = standardization_stats(frontend, (b["audio"] for b in valid_batches(ds, batch_size)))
    std = floored_std(std.numpy(), band_floor)
    cache.parent.mkdir(parents=True, exist_ok=True)
    out = {"mean": mean.numpy().astype(float).tolist(), "std": std.astype(float).tolist(), "digest": digest}
    cache.write_text(json.dumps(out))
    return out["mean"], out["std"]


def pooled_batches(
    source,
    target,
    batch_size: int,
    seed: int,
    epoch: int,
    sizes: tuple[int, int],
    shuffle_buffer: int = 64,
    order_seed: int | None = None,
) -> Iterator[dict]:
    """One epoch of the student's pooled mix: every labelled source and every pseudo-labelled target segment once,
    in domain-pure batches (``{"audio", "labels"}`` or :func:`_target_part`'s keys) interleaved in a
    seeded random order, so each domain weighs by its size (the paper's union of the two sets) and BatchNorm
    still normalises one domain at a time. ``sizes``: the expected (source, target) rows of this reader, for the
    order; rows beyond it are still read. Batches of fewer than 2 rows are dropped (BatchNorm needs 2).
    ``order_seed`` (default ``seed``) seeds the interleaving: data-parallel workers must share it, so that every
    rank reads the same domain at the same step (Ray's streaming split serves the ranks in lockstep, and the
    gradient all-reduce needs the same number of steps everywhere); ``seed`` shuffles the rows."""
    rng = np.random.default_rng([seed if order_seed is None else order_seed, epoch])
    streams = [
        (
            _iter(source, batch_size, seed + 104_729 * (epoch + 1), shuffle_buffer, drop_last=True),
            lambda b: {"audio": b["audio"], "labels": b["labels"]},
        ),
        (_iter(target, batch_size, seed + 7919 * (epoch + 1), shuffle_buffer, drop_last=False), _target_part),
    ]
    order = rng.permutation(np.repeat([0, 1], [sizes[0] // batch_size, max(1, -(-sizes[1] // batch_size))]))
    live = [True, True]

    def pull(d: int) -> dict | None:
        it, part = streams[d]
        while live[d]:
            b = next(it, None)
            if b is None:
                live[d] = False
            elif len(b["audio"]) >= 2:
                return part(b)
        return None

    for d in order:
        b = pull(int(d))
        if b is not None:
            yield b
    for d in (0, 1):  # whatever the expected sizes missed
        while (b := pull(d)) is not None:
            yield b
