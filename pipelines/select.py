"""Automatic selection: rank a finished sweep's trials and register the top k as `mdlda-teacher` versions.

Ranking rule (recorded in MLflow with the table): only trials that finished without error and reported a
finite score; higher best validation mean Pearson r first; ties broken by the lower validation loss at that
epoch, then by trial id. The same table is produced from a live ResultGrid and from the sweep's storage folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mdlda.checkpoints import load_training_state
from mdlda.config import TrialConfig
from mdlda.tracking import TEACHER_MODEL, log_model
from pipelines.ood_fit import training_ood
from pipelines.trial import build_model

TIE_RULE = (
    "only trials that trained out (max_epochs or patience; not cut early by the scheduler); "
    "best valid_r_mean desc, then valid_loss at that epoch asc, then trial_id asc"
)


class SelectionError(RuntimeError):
    """Fewer trials finished than the selection needs."""


# Errors that mean the trial's process or node went away (preemption, node loss, a killed worker), not that the
# trial's code failed: such trials are reported as "lost", not "failed", and never selected.
LOST_ERRORS = (
    "ActorDiedError",
    "RayActorError",
    "ActorUnavailableError",
    "NodeDiedError",
    "WorkerCrashedError",
    "ActorUnschedulableError",
)


def is_lost(error) -> bool:
    """True when Ray reports the trial's worker or node as gone (also for errors read back from storage, where
    only the text survives)."""
    text = f"{type(error).__name__}: {error}"
    cause = getattr(error, "cause", None)
    if cause is not None:
        text += f" {type(cause).__name__}"
    return any(name in text for name in LOST_ERRORS)


def _last_line(error) -> str:
    """The exception line of a trial's error (its traceback is in the trial folder)."""
    lines = [ln.strip() for ln in str(error or "").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def rank_trials(results, metric: str = "valid_r_mean", include_cut: bool = False) -> pd.DataFrame:
    """One row per trial: status, best score, loss at the best epoch, epochs, checkpoint; ranked.

    Status "cut": stopped early by the scheduler (``include_cut=True`` ranks those too)."""
    rows = []
    for r in results:
        df = r.metrics_dataframe
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        row = {
            "trial_id": trial_id,
            "status": ("lost" if is_lost(r.error) else "error") if r.error else "finished",
            "score": math.nan,
            "valid_loss": math.nan,
            "best_epoch": None,
            "epochs": 0,
            "path": r.path,
            "checkpoint": r.checkpoint.path if r.checkpoint else None,
            "error": _last_line(r.error),
        }
        if df is not None and metric in df and len(df):
            s = pd.to_numeric(df[metric], errors="coerce")
            row["epochs"] = int(len(df))
            if s.notna().any():
                i = s.idxmax()
                row["score"] = float(s[i])
                row["valid_loss"] = float(df.loc[i, "valid_loss"]) if "valid_loss" in df else math.nan
                row["best_epoch"] = int(df.loc[i, "epoch"]) if "epoch" in df else None
        if row["status"] == "finished" and not math.isfinite(row["score"]):
            row["status"] = "no_score"
        # a trial the scheduler (ASHA) stopped before the lr decayed and the adversarial weight grew is not
        # compared with trials that trained out; sweeps stored before this flag existed count as trained out
        if row["status"] == "finished" and not include_cut and "trained_out" in df and not df["trained_out"].iloc[-1]:
            row["status"] = "cut"
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    ok = table.status == "finished"
    ranked = table[ok].sort_values(["score", "valid_loss", "trial_id"], ascending=[False, True, True])
    ranked = ranked.assign(rank=range(1, len(ranked) + 1))
    rest = table[~ok].assign(rank=pd.NA).sort_values("trial_id")
    return pd.concat([ranked, rest], ignore_index=True)


def select_top_k(table: pd.DataFrame, k: int, allow_fewer: bool = False) -> pd.DataFrame:
    chosen = table[table.status == "finished"].head(k)
    if len(chosen) < k:
        lost = int((table.status == "lost").sum())
        cut = int((table.status == "cut").sum())
        failed = int((table.status != "finished").sum()) - lost - cut
        msg = (
            f"only {len(chosen)} of {len(table)} trials trained out with a score; {k} teachers were asked for "
            f"({failed} failed or diverged, {lost} lost with their worker or node, {cut} cut early by the scheduler)"
        )
        if not allow_fewer or chosen.empty:
            hint = (
                " Raise num_samples, use scheduler fifo, or select_cut=true to rank scheduler-cut trials too."
                if cut
                else ""
            )
            raise SelectionError(msg + f". Rerun with more samples, or allow_fewer=true to continue with fewer.{hint}")
    return chosen


def best_model_from_checkpoint(checkpoint_dir: str, config: TrialConfig | dict, frontend_stats):
    """Rebuild a trial's model (``config``: a TrialConfig or its dict, e.g. a Tune result's config) with its best
    epoch's weights from its latest checkpoint."""
    trial = config if isinstance(config, TrialConfig) else TrialConfig.model_validate(config)
    model = build_model(trial.model, trial.model_overrides, frontend_stats)
    state = load_training_state(checkpoint_dir)
    model.load_state_dict(state["best_model"] if state.get("best_model") else state["model"])
    return model.eval()


def _trial_run_id(client, experiment_id: str, trial_id: str, sweep: str) -> str | None:
    runs = client.search_runs([experiment_id], f"tags.trial_name LIKE '%{trial_id}' and tags.sweep = '{sweep}'")
    return runs[0].info.run_id if runs else None


@dataclass(frozen=True)
class SweepId:
    """A sweep as its trial runs and registered versions name it: ``name`` (the trial runs' ``sweep`` tag) in the
    MLflow experiment ``experiment`` (id ``experiment_id``)."""

    name: str
    experiment: str
    experiment_id: str

    @property
    def id(self) -> str:
        """The ``sweep_id`` tag of the sweep's registered versions."""
        return f"{self.experiment}/{self.name}"


@dataclass(frozen=True)
class Registration:
    """How the chosen trials are registered: as versions of ``registered_model``; ``extra_tags`` (the lineage
    links) are set on every version, and on the trial runs so the UI shows them; ``ood_shards``: the source shards
    whose training split gives each model its OOD statistics (:mod:`pipelines.ood_fit`, one read for all the
    models registered now)."""

    registered_model: str = TEACHER_MODEL
    extra_tags: dict[str, str] | None = None
    ood_shards: Path | None = None


def register_top_k(
    chosen: pd.DataFrame, results, sweep: SweepId, frontend_stats, registration: Registration = Registration()
) -> list[dict]:
    """Log each chosen trial's best model into its trial run and register it (:class:`Registration`); idempotent
    per (sweep, trial)."""
    registered_model, extra_tags = registration.registered_model, registration.extra_tags
    ood_shards = registration.ood_shards
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    sweep_name, sweep_id, experiment_id = sweep.name, sweep.id, sweep.experiment_id
    configs = {(r.metrics or {}).get("trial_id"): r.config for r in results}
    existing = {}
    try:
        for v in client.search_model_versions(f"name='{registered_model}'"):
            if v.tags.get("sweep_id") == sweep_id:
                existing[v.tags.get("trial_id")] = v
    except Exception:  # the registered model does not exist yet
        existing = {}
    new = {
        row.trial_id: best_model_from_checkpoint(row.checkpoint, configs[row.trial_id], frontend_stats)
        for row in chosen.itertuples(index=False)
        if row.trial_id not in existing
    }
    stats = dict(zip(new, training_ood(list(new.values()), ood_shards), strict=True)) if new and ood_shards else {}
    out = []
    for row in chosen.itertuples(index=False):
        tags = {
            "sweep_id": sweep_id,
            "rank": str(row.rank),
            "val_r_mean": f"{row.score:.6f}",
            "trial_id": row.trial_id,
            "sweep": sweep_name,
        }
        if row.trial_id in existing:
            v = existing[row.trial_id]
        else:
            model = new[row.trial_id]
            run_id = _trial_run_id(client, experiment_id, row.trial_id, sweep_name)
            with mlflow.start_run(
                run_id=run_id,
                experiment_id=experiment_id,
                nested=True,
                run_name=None if run_id else f"{sweep_name}-{row.trial_id}",
            ):
                info = log_model(model, registered_model_name=registered_model, ood=stats.get(row.trial_id))
            v = client.get_model_version(registered_model, str(info.registered_model_version))
        for key, value in tags.items():
            client.set_model_version_tag(registered_model, v.version, key, value)
        for key, value in (extra_tags or {}).items():
            client.set_model_version_tag(registered_model, v.version, key, value)
            client.set_tag(v.run_id, key, value)
        out.append(
            {
                **tags,
                "version": str(v.version),
                "run_id": v.run_id,
                "uri": f"models:/{registered_model}/{v.version}",
            }
        )
    return out
