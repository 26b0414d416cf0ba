"""The datasets a training stage reads (the batch iterators over them are in :mod:`pipelines.batches`).

Source (labelled Mid-level) and target (MAESTRO) segments come from the Parquet shards. A set that fits in the
object store's free memory is materialized once through Ray Data, in one-row blocks (a sweep of many trials then
never re-reads Parquet, and a seeded random block order is a global shuffle). A set that does not fit stays a
lazy Ray Dataset (what Ray Train's ``datasets=`` and other Ray Data readers run) carrying the row index of its
split (:class:`pipelines.shard_dataset.ShardDataset`), built here from the Parquet footers at the stage start; the
batch iterators read it themselves every epoch (:mod:`pipelines.shard_reader`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import ray

from mdlda.params import SEGMENT_BYTES
from pipelines.batches import RAW_LABELS, SPREAD, valid_batches
from pipelines.shard_dataset import _attach_index
from pipelines.shard_index import build_index
from pipelines.shards import read_shards, split_count

logger = logging.getLogger(__name__)

ROW_BYTES = SEGMENT_BYTES + 64  # a training row in the object store: its PCM plus clip id and labels
TRAIN_COLUMNS = ["clip_id", "audio", "labels"]

__all__ = ["RAW_LABELS", "SPREAD", "StageData", "load_stage_data"]


@dataclass
class StageData:
    """Datasets of one training stage plus the manifests they came from (logged with every run).

    ``memory``: the materialisation decision and the sizes it was made from (:func:`plan_materialize`)."""

    source_train: ray.data.Dataset
    source_valid: ray.data.Dataset
    target: ray.data.Dataset | None
    counts: dict[str, int]
    manifests: dict[str, dict] = field(default_factory=dict)
    materialized: bool = False
    memory: dict = field(default_factory=dict)


def plan_materialize(sizes: dict[str, int], free_bytes: float, share: float) -> dict:
    """Which datasets to hold in the object store: in the order given (source train, valid, target), each one
    that still fits in ``share`` x the store's free memory after those before it. Bytes, not rows: the decision
    and every size are returned for the log."""
    budget = share * free_bytes
    plan = {"object_store_free_bytes": int(free_bytes), "share": share, "budget_bytes": int(budget), "sets": {}}
    used = 0
    for name, nbytes in sizes.items():
        keep = used + nbytes <= budget
        used += nbytes if keep else 0
        plan["sets"][name] = {"bytes": int(nbytes), "materialized": keep}
    plan["materialized_bytes"] = int(used)
    return plan


def object_store_free_bytes() -> tuple[float, float]:
    """(free, total) object-store bytes of the cluster now: the store's capacity (``ray.cluster_resources()``)
    less the bytes its objects use (the raylets' store statistics; a private Ray API, so when it is unavailable the
    used bytes count as 0 and the capacity is the free memory)."""
    total = float(ray.cluster_resources().get("object_store_memory", 0.0))
    try:
        from ray._private.internal_api import get_memory_info_reply
        from ray._private.state import state

        used = float(get_memory_info_reply(state).store_stats.object_store_bytes_used)
    except Exception as exc:  # noqa: BLE001 (a private API: never fail the stage on it)
        logger.warning("object store usage unavailable (%s): taking its capacity as free", exc)
        used = 0.0
    return max(total - used, 0.0), total


def _materialize(ds: ray.data.Dataset, rows_per_block: int) -> ray.data.Dataset:
    """Held in the object store in blocks of ``rows_per_block`` rows: with 1, a seeded random block order is a
    global shuffle of the rows that copies nothing (see :func:`pipelines.batches._iter`)."""
    return ds.repartition(target_num_rows_per_block=rows_per_block).materialize()


def load_stage_data(
    source_shards: str | Path,
    target_shards: str | Path | None = None,
    target_splits: list[str] | None = None,
    target_labelled: bool = False,
    materialize_share: float = 0.5,
    rows_per_block: int = 1,
) -> StageData:
    """Source train/valid from the Mid-level shards; target segments (MAESTRO, or pseudo-labelled shards).

    Each set is materialised (held in the object store) when it fits in ``materialize_share`` of the store's free
    memory, source first (:func:`plan_materialize`); the decision and the sizes are logged and kept in
    ``StageData.memory``. A set left out streams from its shards every epoch."""
    src, src_manifest = read_shards(source_shards, splits=["train"], columns=TRAIN_COLUMNS)
    val, _ = read_shards(source_shards, splits=["valid"], columns=TRAIN_COLUMNS)
    counts = {
        "source_train": split_count(src_manifest, ["train"]),
        "source_valid": split_count(src_manifest, ["valid"]),
    }
    manifests = {"source": src_manifest}
    tgt = None
    if target_shards is not None:
        cols = TRAIN_COLUMNS if target_labelled else ["clip_id", "audio"]
        if target_labelled:  # pseudo-labels: the teachers' disagreement, their raw mean (StudentConfig)
            cols = [*cols, *pseudo_extras(target_shards)]
        tgt, tgt_manifest = read_shards(target_shards, splits=target_splits, columns=cols)
        counts["target"] = split_count(tgt_manifest, target_splits)
        manifests["target"] = tgt_manifest
    for name, n in counts.items():
        if n == 0:
            raise ValueError(f"{name} is empty: nothing to train or validate on (check the shard manifests)")
    free, total = object_store_free_bytes()
    plan = plan_materialize({k: n * ROW_BYTES for k, n in counts.items()}, free, materialize_share)
    plan["object_store_total_bytes"] = int(total)
    sets = {"source_train": src, "source_valid": val, "target": tgt}
    where = {
        "source_train": (source_shards, ["train"], TRAIN_COLUMNS),
        "source_valid": (source_shards, ["valid"], TRAIN_COLUMNS),
        "target": (target_shards, target_splits, cols if target_shards is not None else None),
    }
    for name, decision in plan["sets"].items():
        if decision["materialized"]:
            sets[name] = _materialize(sets[name], rows_per_block)
        else:  # streamed: the training iterators read its rows themselves (pipelines/shard_reader.py)
            sets[name] = _attach_index(sets[name], build_index(*where[name]))
        logger.info(
            "%s: %d rows, %.2f GB: %s (object store: %.2f GB free, budget %.0f%% = %.2f GB)",
            name,
            counts[name],
            decision["bytes"] / 1e9,
            "materialized" if decision["materialized"] else "streamed from its shards every epoch",
            plan["object_store_free_bytes"] / 1e9,
            100 * materialize_share,
            plan["budget_bytes"] / 1e9,
        )
    materialized = all(d["materialized"] for d in plan["sets"].values())
    return StageData(sets["source_train"], sets["source_valid"], sets["target"], counts, manifests, materialized, plan)


def pseudo_extras(shards: str | Path) -> list[str]:
    """The optional pseudo-label columns a shard folder has (its manifest's options name them)."""
    from mdlda.manifest import read_manifest

    options = read_manifest(shards).get("options", {})
    return [c for c in (SPREAD, RAW_LABELS) if c in options]


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
