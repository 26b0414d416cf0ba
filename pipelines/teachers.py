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
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from mdlda.config import SweepConfig, TrialConfig, search_target
from pipelines.budget import BudgetedVariantGenerator, set_budget
from pipelines.data import StageData
from pipelines.mlflow_callback import BatchedMLflowLoggerCallback
from pipelines.progress import SweepProgress
from pipelines.spaces import grid_size, to_tune
from pipelines.trial import train_trial

logger = logging.getLogger(__name__)


@dataclass
class SweepResult:
    name: str
    path: str
    results: Any  # ray.tune.ResultGrid
    resumed: bool
    ran: bool = True
    total: int = 0  # trials the search space defines (num_samples x grid)
    stopped_by: str | None = None  # the budget that stopped launching trials, if one did


def trial_resources(sweep: SweepConfig, materialized: bool) -> tuple[dict, int]:
    """Per-trial resources and max concurrency sized from the cluster (one CPU left for Ray Data when the
    data is streamed lazily: with every CPU taken by trials, a lazy Ray Data read never runs)."""
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 1.0), res.get("GPU", 0.0)
    per = {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
    free = cpus - (0 if materialized else 1)
    if free < sweep.cpus_per_trial:
        raise RuntimeError(
            f"the cluster has {cpus:g} CPUs; a trial needs {sweep.cpus_per_trial:g} and Ray Data needs one free "
            "CPU for streaming: lower cpus_per_trial or give the object store more memory (materialize_share)"
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
    """Tune's ``param_space`` in the shape of a :class:`mdlda.config.TrialConfig`: the fixed settings, and every
    searched one as a Tune distribution in its own section (``mdlda.config`` checked at load where each key
    belongs). Tune draws the distributions in this order: ``train`` first, then ``model_overrides``."""
    searched: dict[str, dict[str, Any]] = {"train": {}, "model_overrides": {}}
    for key, spec in sweep.search.items():
        searched[search_target(key)][key] = spec
    train = {"mode": sweep.mode, **sweep.train.model_dump(mode="json", exclude_unset=True, exclude={"mode"})}
    where = f"{sweep.name}.search"
    return {
        "model": sweep.model,
        "train": {**train, **to_tune(searched["train"], where=where)},
        "model_overrides": {**sweep.model_overrides, **to_tune(searched["model_overrides"], where=where)},
    }


def trial_params(config: dict) -> dict[str, Any]:
    """A trial's MLflow params, flat as the YAML names them (``lr``, ``adv_scale``, ``width``)."""
    return TrialConfig.model_validate(config).params()


@dataclass(frozen=True)
class SweepPlace:
    """Where a sweep runs and logs: its trials under ``storage``, their MLflow runs in ``experiment_name`` at
    ``tracking_uri``, nested under the stage run ``parent_run_id`` when there is one."""

    storage: str | Path
    experiment_name: str
    parent_run_id: str | None
    tracking_uri: str


def run_sweep(
    sweep: SweepConfig,
    data: StageData,
    frontend_stats: tuple[list[float], list[float]],
    place: SweepPlace,
) -> SweepResult:
    """Run (or resume, or read back) the sweep ``sweep.name`` under ``place.storage``."""
    storage, experiment_name = place.storage, place.experiment_name
    parent_run_id, tracking_uri = place.parent_run_id, place.tracking_uri
    storage = str(Path(storage).resolve()) if "://" not in str(storage) else str(storage)
    path = f"{storage.rstrip('/')}/{sweep.name}"
    trainable = tune.with_parameters(train_trial, data=data, frontend_stats=frontend_stats)
    per, limit = trial_resources(sweep, data.materialized)
    trainable = tune.with_resources(trainable, per)
    space = param_space(sweep)
    total = sweep.num_samples * grid_size(space)
    budget = set_budget(sweep.max_trials, sweep.time_budget_s)
    planned = min(total, sweep.max_trials) if sweep.max_trials is not None else total
    resumed = tune.Tuner.can_restore(path)
    if resumed:
        tuner = tune.Tuner.restore(
            path, trainable=trainable, resume_errored=False, restart_errored=False, resume_unfinished=True
        )
        stored = stored_trials(path)
        if sweep_finished(path) and (stored >= planned or budget.reason(stored)):
            # read the stored results back; nothing is rerun
            return SweepResult(sweep.name, path, tuner.get_results(), resumed=True, ran=False, total=total)
        logger.info("resuming sweep %s from %s (%d of %d trials stored)", sweep.name, path, stored, planned)
    else:
        max_t = sweep.train.max_epochs
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
        callback = BatchedMLflowLoggerCallback(
            tracking_uri=tracking_uri,
            experiment_name=experiment_name,
            tags=tags,
            save_artifact=False,
            params=trial_params,
        )
        progress = SweepProgress(total=planned, metric=sweep.metric, name=sweep.name, max_epochs=max_t)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode_metric,
                scheduler=scheduler,
                num_samples=sweep.num_samples,
                # Tune's default generator, which also stops launching trials when the budget is spent
                search_alg=BudgetedVariantGenerator(max_concurrent=limit, random_state=sweep.search_seed),
                reuse_actors=True,  # no new process per trial: fit() re-seeds and resets its state each time
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
    stopped_by = budget.reason(len(results)) if len(results) < total else None
    if stopped_by:
        logger.warning(
            "sweep %s: %s; %d of %d trials ran, selecting from those", sweep.name, stopped_by, len(results), total
        )
    return SweepResult(sweep.name, path, results, resumed, ran=True, total=total, stopped_by=stopped_by)


def stored_trials(path: str | Path) -> int:
    """How many trials the sweep stored at ``path`` has launched so far (0 when nothing is readable)."""
    from ray.tune import ExperimentAnalysis

    try:
        return len(ExperimentAnalysis(str(path)).trials)
    except Exception:
        return 0


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
    from pipelines.select import is_lost

    ok = [r for r in results if r.error is None]
    lost = sum(1 for r in results if r.error is not None and is_lost(r.error))
    scores = [r.metrics.get("best_valid_r_mean") for r in ok if r.metrics]
    scores = [s for s in scores if s is not None and math.isfinite(s)]
    return {
        "trials": len(results),
        "finished": len(ok),
        "failed": len(results) - len(ok) - lost,
        "lost": lost,
        "best_valid_r_mean": max(scores) if scores else None,
    }
