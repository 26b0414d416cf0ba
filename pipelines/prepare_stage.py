"""The chain's prepare stage: both datasets' shards (pipelines/prepare.py) under its stage run, and the inputs the
training stages read back from them (datasets, front-end statistics and the digest naming both)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import mlflow

from mdlda.config import ChainConfig
from pipelines import runs
from pipelines.data import StageData, frontend_stats, load_stage_data
from pipelines.prepare import PrepareConfig, PrepareResult, prepare

logger = logging.getLogger(__name__)


@dataclass
class PrepareStageResult:
    midlevel: PrepareResult
    maestro: PrepareResult

    @property
    def did_work(self) -> bool:
        return not (self.midlevel.skipped_work and self.maestro.skipped_work)


class ChainInputs(NamedTuple):
    """What the training stages read: source/target datasets, the front-end statistics and the digest of both
    shard sets with the band floor (the front-end statistics are part of what a sweep trains on)."""

    data: StageData
    fstats: tuple
    digest: str


def prepare_stage(cfg: ChainConfig, data_root: Path, ctx: runs.StageContext) -> PrepareStageResult:
    """Prepare (or find up to date) the Mid-level and MAESTRO shards; log their manifests with the stage run."""
    d = cfg.data
    piano = str(data_root / d.piano_ids) if d.piano_ids else None
    with runs.stage(ctx, "prepare"):
        ml = prepare(
            PrepareConfig(
                dataset="midlevel",
                root=str(data_root / d.midlevel_root),
                out=str(ctx.shards("midlevel")),
                piano_ids=piano,
                seed=d.seed,
                eval_fraction=d.eval_fraction,
                valid_fraction=d.valid_fraction,
                max_failure_share=d.max_failure_share,
            )
        )
        ma = prepare(
            PrepareConfig(
                dataset="maestro",
                root=str(data_root / d.maestro_root),
                out=str(ctx.shards("maestro")),
                splits=d.maestro_splits,
                max_performances=d.max_performances,
                seed=d.seed,
                max_failure_share=d.max_failure_share,
            )
        )
        for name, r in (("midlevel", ml), ("maestro", ma)):
            runs.log_json(r.manifest, f"manifest-{name}.json")
            mlflow.log_metrics({f"{name}_{k}_rows": v for k, v in r.manifest["counts"].items()})
            mlflow.log_metric(f"{name}_warnings", r.manifest.get("n_warnings", 0))  # e.g. truncated MAESTRO files
            for w in r.manifest.get("warnings", []):
                logger.warning("prepare %s: %s: %s", name, w["item"], w["reason"])
            mlflow.set_tag(f"shards.{name}.digest", r.manifest["content_digest"])
    return PrepareStageResult(ml, ma)


def load_inputs(cfg: ChainConfig, workdir: Path, say: Callable[[str], None] = lambda msg: None) -> ChainInputs:
    """The training stages' inputs from ``workdir``/shards; refuses missing or foreign shards before loading."""
    from mdlda.manifest import read_manifest

    midlevel, maestro = workdir / "shards" / "midlevel", workdir / "shards" / "maestro"
    ml, ma = read_manifest(midlevel), read_manifest(maestro)
    say("loading the shards (materialized when small enough) and the front-end statistics")
    data = load_stage_data(
        str(midlevel), str(maestro), target_splits=cfg.data.maestro_splits, materialize_share=cfg.materialize_share
    )
    fstats = frontend_stats(str(midlevel), data.source_train, workdir / "cache", band_floor=cfg.band_floor)
    digest = ml["content_digest"] + ma["content_digest"] + f"-floor{cfg.band_floor:g}"
    return ChainInputs(data, fstats, digest)
