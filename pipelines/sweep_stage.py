"""The chain's sweep stages, `mdlda teachers [--baseline] [--select-only] [--rerun]`: the Ray Tune sweep of
pipelines/teachers.py under its stage run, then the top-k selection and registration (pipelines/select.py).

The sweep and ``--select-only`` rank, select and register through the same :func:`select_and_register`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from mdlda.config import SweepConfig, config_digest, identity
from mdlda.tracking import BASELINE_MODEL, TEACHER_MODEL
from pipelines import runs
from pipelines.prepare_stage import ChainInputs
from pipelines.rerun import RerunResult, rerun_trial
from pipelines.select import TIE_RULE, Registration, SweepId, rank_trials, register_top_k, select_top_k
from pipelines.teachers import SweepPlace, SweepResult, run_sweep, summarize, sweep_finished

logger = logging.getLogger(__name__)


@dataclass
class Selection:
    """A sweep's ranked trials, the chosen top k and the registered versions of those (dicts of their tags)."""

    table: pd.DataFrame
    chosen: pd.DataFrame
    registered: list[dict]


@dataclass
class SweepStageResult:
    chosen: list[dict]  # the registered top k, by rank (empty when the sweep does not register)
    did_work: bool


def sweep_name(sweep: SweepConfig, data_digest: str) -> str:
    """The sweep's storage folder and trial-run tag: its config name and a digest of its identity and its data."""
    return f"{sweep.name}-{config_digest({'sweep': identity(sweep), 'data': data_digest})[:8]}"


def stage_name(sweep: SweepConfig, baseline: bool) -> str:
    return f"baseline:{sweep.name}" if baseline else "teachers"


def registry_name(baseline: bool) -> str:
    return BASELINE_MODEL if baseline else TEACHER_MODEL


def registered(sweep: SweepConfig, baseline: bool, inputs: ChainInputs, ctx: runs.StageContext) -> list[dict]:
    """The versions this chain's sweep ``sweep`` registered, by rank."""
    sweep_id = SweepId(sweep_name(sweep, inputs.digest), ctx.experiment, ctx.exp_id).id
    return runs.registered_for_sweep(registry_name(baseline), sweep_id)


def select_and_register(
    sweep: SweepConfig,
    res: SweepResult,
    ctx: runs.StageContext,
    fstats,
    links: dict[str, str] | None = None,
    registered_model: str = TEACHER_MODEL,
) -> Selection:
    """Rank the trials of ``res`` (``sweep.name``: the stored sweep's name), choose the top ``sweep.top_k`` and
    register them when ``sweep.register_models``; ``links``: the lineage tags of every version."""
    table = rank_trials(res.results, sweep.metric, include_cut=sweep.select_cut)
    if mlflow.active_run() is not None:  # the sweep's stage run keeps the table, also when too few trials finished
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "selection.csv"
            table.drop(columns=["checkpoint"]).to_csv(path, index=False)
            mlflow.log_artifact(str(path))
    # a sweep its budget stopped selects from what finished, even when that is fewer than k
    chosen = select_top_k(table, sweep.top_k, allow_fewer=sweep.allow_fewer or bool(res.stopped_by))
    if len(chosen) < sweep.top_k:
        logger.warning(
            "sweep %s: selecting %d of the %d asked for (%s)", sweep.name, len(chosen), sweep.top_k, res.stopped_by
        )
    if not sweep.register_models:
        return Selection(table, chosen, [])
    if len(chosen):
        logger.info("%s: registering the top %d as %s", sweep.name, len(chosen), registered_model, extra={"show": True})
    where = SweepId(sweep.name, ctx.experiment, ctx.exp_id)
    registration = Registration(registered_model, extra_tags=links, ood_shards=ctx.shards("midlevel"))
    found = register_top_k(chosen, res.results, where, fstats, registration)
    return Selection(table, chosen, found)


def sweep_stage(sweep: SweepConfig, baseline: bool, inputs: ChainInputs, ctx: runs.StageContext) -> SweepStageResult:
    """Run/resume the sweep under its stage run, rank its trials, register the top k."""
    data, fstats, digest = inputs
    name = sweep_name(sweep, digest)
    with runs.stage(ctx, stage_name(sweep, baseline)) as run:
        mlflow.log_params(
            {
                "sweep_name": name,
                "num_samples": sweep.num_samples,
                "top_k": sweep.top_k,
                "selection_metric": sweep.metric,
                "selection_mode": sweep.mode_metric,
                "tie_rule": TIE_RULE,
            }
        )
        runs.log_json(sweep.model_dump(mode="json"), "sweep_config.json")
        runs.log_json(data.memory, "materialize.json")  # which sets the object store held, and the sizes behind it
        links = runs.log_manifests_read(
            run, {"midlevel": data.manifests["source"], "maestro": data.manifests["target"]}
        )
        links.update({"lineage.sweep_run": run.info.run_id, "lineage.sweep": name})
        sweep = sweep.model_copy(update={"name": name})
        place = SweepPlace(ctx.workdir / "ray_results", ctx.experiment, run.info.run_id, ctx.uri)
        res = run_sweep(sweep, data, fstats, place)
        info = summarize(res.results)
        mlflow.log_metrics({f"trials_{k}": v for k, v in info.items() if isinstance(v, int | float) and v is not None})
        # budgets are tags, not params: a rerun of the same sweep may be given another budget
        mlflow.set_tags(
            {
                "budget.max_trials": str(sweep.max_trials),
                "budget.time_budget_s": str(sweep.time_budget_s),
                "budget.stopped_by": res.stopped_by or "",
                "trials_planned": str(res.total),
            }
        )
        sel = select_and_register(sweep, res, ctx, fstats, links, registry_name(baseline))
        runs.log_json(sel.registered, "registered.json")
    return SweepStageResult(sel.registered, res.ran)


def select_stage(sweep: SweepConfig, baseline: bool, inputs: ChainInputs, ctx: runs.StageContext) -> Selection:
    """Rank a finished sweep from its storage folder (no training) and register the same top k; the selection
    is registered also when the config does not register the sweep's models (``--select-only`` prints versions)."""
    from ray import tune

    from pipelines.trial import train_trial

    name = sweep_name(sweep, inputs.digest)
    path = ctx.workdir / "ray_results" / name
    if not sweep_finished(path):
        raise FileNotFoundError(f"{path}: no finished sweep stored there (run `mdlda teachers` first)")
    results = tune.Tuner.restore(str(path), trainable=train_trial).get_results()
    res = SweepResult(name, str(path), results, resumed=True, ran=False)
    sweep = sweep.model_copy(update={"name": name, "register_models": True})
    return select_and_register(sweep, res, ctx, inputs.fstats, registered_model=registry_name(baseline))


def rerun_stage(
    sweep: SweepConfig, baseline: bool, trial_id: str, inputs: ChainInputs, ctx: runs.StageContext
) -> RerunResult:
    """Train one trial of this chain's stored sweep again from its recorded config and compare its per-epoch
    validation scores with the logged ones (a nested MLflow run under the sweep's stage run)."""
    from pipelines.mlflow_callback import BatchedMLflowLoggerCallback

    data, fstats, digest = inputs
    name = sweep_name(sweep, digest)
    with runs.stage(ctx, stage_name(sweep, baseline)) as run:
        tags = {"mlflow.parentRunId": run.info.run_id, "sweep": name, "rerun_of": trial_id}
        callback = BatchedMLflowLoggerCallback(
            tracking_uri=ctx.uri, experiment_name=ctx.experiment, tags=tags, save_artifact=False
        )
        stored = sweep.model_copy(update={"name": name})
        return rerun_trial(stored, trial_id, data, fstats, ctx.workdir / "ray_results", callbacks=[callback])
