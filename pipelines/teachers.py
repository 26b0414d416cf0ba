"""Stage 2, `mdlda teachers`: a Ray Tune sweep of DANN RF-ResNet teachers (or, `--baseline`, of the same models
without the adversary), each trial a child MLflow run, then the automatic top-k selection (pipelines/select.py).

Rerunning the same command resumes an interrupted sweep from its storage folder (finished trials are not
redone) and returns the stored results of a finished one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from mdlda.config import SweepConfig
from pipelines.data import StageData
from pipelines.progress import SweepProgress
from pipelines.spaces import to_tune
from pipelines.trial import train_trial

logger = logging.getLogger(__name__)


@dataclass
class SweepResult:
    name: str
    path: str
    results: Any  # ray.tune.ResultGrid
    resumed: bool
    ran: bool = True


def trial_resources(sweep: SweepConfig, materialized: bool) -> tuple[dict, int]:
    """Per-trial resources and max concurrency sized from the cluster (one CPU left for Ray Data when the
    data is streamed lazily, see NOTES-ray-mlflow)."""
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 1.0), res.get("GPU", 0.0)
    per = {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
    free = cpus - (0 if materialized else 1)
    if free < sweep.cpus_per_trial:
        raise RuntimeError(
            f"the cluster has {cpus:g} CPUs; a trial needs {sweep.cpus_per_trial:g} and Ray Data needs one free "
            "CPU for streaming: lower cpus_per_trial or raise materialize_max_gb"
        )
    limit = int(free // sweep.cpus_per_trial)
    if sweep.gpus_per_trial > 0:
        if gpus < sweep.gpus_per_trial:  # an autoscaling cluster starts with 0 GPU workers
            logger.warning(
                "trials ask for %s GPU and the cluster has %g now; Tune will wait for the autoscaler to add GPU "
                "workers (set max_concurrent to bound the concurrency)",
                sweep.gpus_per_trial,
                gpus,
            )
            limit = sweep.max_concurrent or sweep.num_samples
        else:
            limit = min(limit, int(gpus // sweep.gpus_per_trial))
    if sweep.max_concurrent:
        limit = min(limit, sweep.max_concurrent)
    return per, max(1, limit)


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Fixed settings + search space, flat (see pipelines/trial.py for how keys are routed)."""
    fixed = {"model": sweep.model, "mode": sweep.mode, **sweep.model_overrides, **sweep.train}
    clash = sorted(set(fixed) & set(sweep.search))
    if clash:
        raise ValueError(f"sweep {sweep.name!r}: {clash} are both fixed and searched")
    return {**fixed, **to_tune(sweep.search, where=f"{sweep.name}.search")}


def run_sweep(
    sweep: SweepConfig,
    data: StageData,
    frontend_stats: tuple[list[float], list[float]],
    storage: str | Path,
    experiment_name: str,
    parent_run_id: str | None,
    tracking_uri: str,
) -> SweepResult:
    """Run (or resume, or read back) the sweep ``sweep.name`` under ``storage``."""
    storage = str(Path(storage).resolve()) if "://" not in str(storage) else str(storage)
    path = f"{storage.rstrip('/')}/{sweep.name}"
    trainable = tune.with_parameters(train_trial, data=data, frontend_stats=frontend_stats)
    per, limit = trial_resources(sweep, data.materialized)
    trainable = tune.with_resources(trainable, per)
    resumed = tune.Tuner.can_restore(path)
    if resumed:
        tuner = tune.Tuner.restore(
            path, trainable=trainable, resume_errored=False, restart_errored=False, resume_unfinished=True
        )
        if sweep_finished(path):  # read the stored results back; nothing is rerun
            return SweepResult(sweep.name, path, tuner.get_results(), resumed=True, ran=False)
        logger.info("resuming sweep %s from %s", sweep.name, path)
    else:
        max_t = int(sweep.train.get("max_epochs", 99))
        if sweep.scheduler == "asha":
            scheduler = ASHAScheduler(
                time_attr="training_iteration",
                max_t=max_t,
                grace_period=min(sweep.grace_period, max_t),
                reduction_factor=sweep.reduction_factor,
            )
        else:
            scheduler = FIFOScheduler()
        tags = {"mlflow.parentRunId": parent_run_id, "sweep": sweep.name} if parent_run_id else {"sweep": sweep.name}
        callback = MLflowLoggerCallback(
            tracking_uri=tracking_uri, experiment_name=experiment_name, tags=tags, save_artifact=False
        )
        space = param_space(sweep)
        grid = math.prod(len(v["grid_search"]) for v in space.values() if isinstance(v, dict) and "grid_search" in v)
        progress = SweepProgress(total=sweep.num_samples * grid, metric=sweep.metric)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode_metric,
                scheduler=scheduler,
                num_samples=sweep.num_samples,
                max_concurrent_trials=limit,
                reuse_actors=True,  # no new process per trial: fit() re-seeds and resets its state each time
                time_budget_s=sweep.time_budget_s,
            ),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=storage,
                callbacks=[callback, progress],
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures_per_trial),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
    results = tuner.fit()
    return SweepResult(sweep.name, path, results, resumed, ran=True)


def sweep_finished(path: str | Path) -> bool:
    """True when every trial of the stored sweep at ``path`` ended (finished, stopped early or failed)."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(str(path)).trials
    except Exception:  # nothing readable stored yet
        return False
    return bool(trials) and all(t.status in ("TERMINATED", "ERROR") for t in trials)


def summarize(results) -> dict[str, Any]:
    """Counts and the best finite score of a ResultGrid (for logs and the CLI)."""
    ok = [r for r in results if r.error is None]
    scores = [r.metrics.get("best_valid_r_mean") for r in ok if r.metrics]
    scores = [s for s in scores if s is not None and math.isfinite(s)]
    return {
        "trials": len(results),
        "finished": len(ok),
        "failed": len(results) - len(ok),
        "best_valid_r_mean": max(scores) if scores else None,
    }
