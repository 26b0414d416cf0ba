"""`mdlda run` / `make demo`: the whole chain, resumable stage by stage.

prepare -> baselines -> teachers -> select -> pseudo-label -> student -> evaluation summary. One MLflow parent run
per chain config (found again by its digest on a rerun), one nested run per stage. A stage whose outputs exist
and match is skipped, so rerunning a finished chain does no work; a killed chain continues where it stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.text import Text

from mdlda.config import ChainConfig, SweepConfig, config_digest, identity
from mdlda.logs import setup_file_logging
from mdlda.tracking import STUDENT_MODEL, setup_tracking, tracking_uri
from pipelines import stages
from pipelines.preflight import check_durability
from pipelines.raysetup import init_ray

logger = logging.getLogger(__name__)


@dataclass
class ChainResult:
    workdir: str
    tracking_uri: str
    parent_run_id: str
    teachers: list[dict] = field(default_factory=list)
    student: dict = field(default_factory=dict)
    summary: pd.DataFrame | None = None
    did_work: dict[str, bool] = field(default_factory=dict)


def sweep_name(sweep: SweepConfig, data_digest: str) -> str:
    return f"{sweep.name}-{config_digest({'sweep': identity(sweep), 'data': data_digest})[:8]}"


class Chain:
    """One chain config + workdir: its MLflow parent run, its shards and the steps, callable one by one.

    ``mdlda run`` calls every step in order; ``mdlda teachers`` / ``pseudolabel`` / ``student`` / ``evaluate``
    call one step on the outputs earlier steps left in the workdir.
    """

    def __init__(
        self,
        cfg: ChainConfig,
        workdir: str | Path,
        address: str | None = None,
        console: Console | None = None,
        verbose: bool = False,
    ) -> None:
        self.cfg = cfg
        self.console = console or Console()
        self.started = time.monotonic()
        self.workdir = Path(workdir).resolve()
        self.exp_id = setup_tracking(self.workdir, cfg.experiment)  # fail fast, before any compute
        self.log_file = setup_file_logging(self.workdir)  # size-capped (mdlda/logs.py)
        self.uri = tracking_uri(self.workdir)
        init_ray(address, quiet=not verbose)  # quiet: workers' output stays in Ray's logs, not on this console
        # a multi-node run refuses storage that dies with a node (pipelines/preflight.py)
        check_durability(self.workdir, self.uri, MlflowClient().get_experiment(self.exp_id).artifact_location)
        self.key = config_digest({"cfg": identity(cfg), "workdir": str(self.workdir)})
        self.parent = stages.parent_run(self.exp_id, self.key, cfg)
        self.result = ChainResult(str(self.workdir), self.uri, self.parent)
        self._data = None
        self.models: dict[str, str] = {}
        self.pseudo_name = "pseudolabels"  # shards/<name>: the ablation gives every seed its own

    def say(self, msg: str) -> None:
        m, sec = divmod(int(time.monotonic() - self.started), 60)
        self.console.print(f"[dim]{m:02d}:{sec:02d}[/] {msg}", soft_wrap=True)  # one line each, also in a log file
        logger.info("%s", Text.from_markup(msg).plain)  # and in mdlda.log

    def shards(self, name: str) -> Path:
        return self.workdir / "shards" / name

    # --------------------------------------------------------------------------------------------- steps
    def prepare(self, data_root: str | Path) -> None:
        with stages.stage(self.exp_id, self.parent, "prepare") as run:
            ml, ma = stages.prepare_all(self.cfg, Path(data_root).resolve(), self.workdir, run)
        self.result.did_work["prepare"] = not (ml.skipped_work and ma.skipped_work)
        self.say(
            f"prepare: midlevel {ml.manifest['counts']}, maestro {ma.manifest['rows']} segments"
            + ("" if self.result.did_work["prepare"] else " (up to date)")
        )

    @property
    def data(self):
        """Source/target datasets and front-end statistics (loaded once; refuses missing or foreign shards)."""
        if self._data is None:
            from mdlda.manifest import read_manifest

            ml, ma = read_manifest(self.shards("midlevel")), read_manifest(self.shards("maestro"))
            self.say("loading the shards (materialized when small enough) and the front-end statistics")
            data = stages.stage_data(self.cfg, str(self.shards("midlevel")), str(self.shards("maestro")))
            fstats = stages.frontend_stats_for(str(self.shards("midlevel")), data, self.workdir, self.cfg.band_floor)
            digest = ml["content_digest"] + ma["content_digest"] + f"-floor{self.cfg.band_floor:g}"
            self._data = (data, fstats, digest)  # the front-end statistics are part of what a sweep trains on
        return self._data

    def sweep(self, sweep: SweepConfig, baseline: bool) -> list[dict]:
        data, fstats, digest = self.data
        stage_name = f"baseline:{sweep.name}" if baseline else "teachers"
        with stages.stage(self.exp_id, self.parent, stage_name) as run:
            chosen, worked = stages.sweep_and_select(
                sweep,
                sweep_name(sweep, digest),
                data,
                fstats,
                self.workdir,
                self.cfg.experiment,
                self.exp_id,
                run,
                self.uri,
                k=sweep.top_k,
                registered_model="mdlda-baseline" if baseline else "mdlda-teacher",
            )
        self.result.did_work[stage_name] = worked
        return chosen

    def baselines(self) -> None:
        for sweep in self.cfg.baselines:
            chosen = self.sweep(sweep, baseline=True)
            self.models[sweep.name] = chosen[0]["uri"]
            self.say(
                f"baseline {sweep.name}: best valid r {float(chosen[0]['val_r_mean']):.3f} -> {chosen[0]['uri']}"
                + _up_to_date(self.result.did_work[f"baseline:{sweep.name}"])
            )

    def teachers(self) -> None:
        teachers = self.sweep(self.cfg.teachers, baseline=False)
        self.result.teachers = teachers
        for t in teachers:
            self.models[f"teacher-{t['rank']}"] = t["uri"]
        self.say(
            f"teachers: {len(teachers)} selected: "
            + ", ".join(f"{t['uri']} (r {float(t['val_r_mean']):.3f})" for t in teachers)
            + _up_to_date(self.result.did_work["teachers"])
        )

    def pseudolabel(self) -> None:
        data, _, _ = self.data
        teachers = self.result.teachers or self.teachers_registered()
        with stages.stage(self.exp_id, self.parent, "pseudolabel"):
            pl = stages.pseudolabel_stage(
                self.cfg,
                [t["uri"] for t in teachers],
                str(self.shards("maestro")),
                self.shards(self.pseudo_name),
                data,
                self.uri,
            )
        self.result.did_work["pseudolabel"] = not pl.skipped_work
        self.say(
            f"pseudolabel: {pl.manifest['rows']} MAESTRO segments labelled by the teachers' mean"
            + _up_to_date(self.result.did_work["pseudolabel"])
        )

    def student(self) -> None:
        data, fstats, _ = self.data
        with stages.stage(self.exp_id, self.parent, "student") as run:
            student, worked = stages.student_stage(
                self.cfg,
                str(self.shards("midlevel")),
                str(self.shards(self.pseudo_name)),
                fstats,
                self.workdir,
                self.key,
                run,
                data,
            )
        self.result.did_work["student"] = worked
        self.result.student = student
        self.models["student"] = student["uri"]
        self.say(
            f"student: {student['uri']} valid r {float(student['val_r_mean']):.3f}"
            + (" (champion)" if student.get("champion") else "")  # not "[champion]": rich reads that as markup
            + _up_to_date(worked)
        )

    def evaluate(self, models: dict[str, str] | None = None) -> None:
        models = models or self.models
        teachers = [m for m in models if m.startswith("teacher-")]
        ensembles = {"teacher-ensemble": teachers} if len(teachers) > 1 else {}
        adabn = [b.name for b in self.cfg.baselines if b.name in models]  # the bar DA has to clear
        with stages.stage(self.exp_id, self.parent, "evaluate"):
            table, worked = stages.evaluate_stage(models, ensembles, adabn, self.cfg, self.workdir)
        self.result.did_work["evaluate"] = worked
        self.result.summary = table
        _print_summary(self.console, table, self.workdir, self.uri, models, self.parent)

    def select_only(self, sweep: SweepConfig, baseline: bool) -> list[dict]:
        """Rank a finished sweep from its storage folder (no training) and register/print the same top-k."""
        from ray import tune

        from pipelines.select import rank_trials, register_top_k, select_top_k
        from pipelines.teachers import sweep_finished
        from pipelines.trial import train_trial

        _, fstats, digest = self.data
        name = sweep_name(sweep, digest)
        path = self.workdir / "ray_results" / name
        if not sweep_finished(path):
            raise FileNotFoundError(f"{path}: no finished sweep stored there (run `mdlda teachers` first)")
        results = tune.Tuner.restore(str(path), trainable=train_trial).get_results()
        table = rank_trials(results, sweep.metric, include_cut=sweep.select_cut)
        chosen = select_top_k(table, sweep.top_k, sweep.allow_fewer)
        registered = register_top_k(
            chosen,
            results,
            sweep.name,
            f"{self.cfg.experiment}/{name}",
            self.exp_id,
            fstats,
            "mdlda-baseline" if baseline else "mdlda-teacher",
        )
        from rich.table import Table

        t = Table(title=f"{name}: top {sweep.top_k} by {sweep.metric}")
        for c in ("rank", "trial_id", "score", "valid_loss", "best_epoch", "version"):
            t.add_column(c)
        for row, reg in zip(chosen.itertuples(), registered, strict=True):
            t.add_row(
                str(row.rank),
                row.trial_id,
                f"{row.score:.4f}",
                f"{row.valid_loss:.4f}",
                str(row.best_epoch),
                reg["uri"],
            )
        self.console.print(t)
        return registered

    def rerun(self, sweep: SweepConfig, baseline: bool, trial_id: str):
        """Train one trial of this chain's stored sweep again from its recorded config and compare its
        per-epoch validation scores with the logged ones (a nested MLflow run under the sweep's stage run)."""
        from pipelines.mlflow_callback import BatchedMLflowLoggerCallback
        from pipelines.teachers import RERUN_TOLERANCE, rerun_trial

        data, fstats, digest = self.data
        name = sweep_name(sweep, digest)
        stage_name = f"baseline:{sweep.name}" if baseline else "teachers"
        with stages.stage(self.exp_id, self.parent, stage_name) as run:
            tags = {"mlflow.parentRunId": run.info.run_id, "sweep": name, "rerun_of": trial_id}
            callback = BatchedMLflowLoggerCallback(
                tracking_uri=self.uri, experiment_name=self.cfg.experiment, tags=tags, save_artifact=False
            )
            res = rerun_trial(
                sweep,
                self.workdir / "ray_results" / name,
                trial_id,
                data,
                fstats,
                self.workdir / "ray_results",
                sweep.metric,
                callbacks=[callback],
            )
        from rich.table import Table

        t = Table(title=f"rerun of {trial_id} ({name}): {sweep.metric} per epoch")
        for c in ("epoch", "logged", "rerun", "|diff|"):
            t.add_column(c, justify="right")
        for row in res.comparison.itertuples():
            t.add_row(str(row.epoch), f"{row.logged:.6f}", f"{row.rerun:.6f}", f"{row.abs_diff:.2e}")
        self.console.print(t)
        verdict = "matches" if res.matches else "DOES NOT match"
        self.say(
            f"rerun {verdict} the logged scores (max |diff| {res.max_abs_diff:.2e}, tolerance {RERUN_TOLERANCE:g})"
        )
        return res

    def registered_models(self) -> dict[str, str]:
        """name -> URI of this chain's registered baselines, teachers and champion student."""
        _, _, digest = self.data
        out = {}
        for sweep in self.cfg.baselines:
            found = stages.registered_for_sweep("mdlda-baseline", f"{self.cfg.experiment}/{sweep_name(sweep, digest)}")
            if found:
                out[sweep.name] = found[0]["uri"]
        for t in self.teachers_registered():
            out[f"teacher-{t['rank']}"] = t["uri"]
        out["student"] = "models:/mdlda-student@champion"
        return out

    def teachers_registered(self) -> list[dict]:
        """The teachers this chain's sweep registered (for a pseudo-label step run on its own)."""
        _, _, digest = self.data
        found = stages.registered_for_sweep(
            "mdlda-teacher", f"{self.cfg.experiment}/{sweep_name(self.cfg.teachers, digest)}"
        )
        if not found:
            raise RuntimeError("no registered teachers for this config: run `mdlda teachers` first")
        return found


def run_chain(
    cfg: ChainConfig,
    data_root: str | Path,
    workdir: str | Path,
    address: str | None = None,
    console: Console | None = None,
    verbose: bool = False,
) -> ChainResult:
    """Every step in order; a step whose outputs exist and match does no work."""
    chain = Chain(cfg, workdir, address, console, verbose)
    chain.say(f"[bold]mdlda chain[/] {chain.key} — MLflow run {chain.parent} in {chain.uri}")
    chain.prepare(data_root)
    chain.baselines()
    chain.teachers()
    chain.pseudolabel()
    chain.student()
    chain.evaluate()
    stages.finish_parent(chain.parent, chain.result)
    return chain.result


def _up_to_date(worked: bool) -> str:
    """The suffix of a stage line whose outputs existed and matched (a rerun skipped the stage's work)."""
    return "" if worked else " (up to date: nothing redone)"


def _print_summary(
    console: Console,
    table: pd.DataFrame,
    workdir: Path,
    uri: str,
    models: dict[str, str] | None = None,
    run_id: str | None = None,
) -> None:
    from rich.table import Table

    from pipelines.evaluate import summary_pivot

    r, rmse = summary_pivot(table), summary_pivot(table, "rmse_mean")
    scale = summary_pivot(table, "in_scale") if "in_scale" in table else None
    t = Table(title="mean Pearson r and RMSE (rating points) on the test splits, share of outputs inside 1..10")
    t.add_column("model", overflow="fold")  # never an ellipsis: "baseline-rf…" hides which baseline
    names = {"test": "non-piano", "piano_test": "piano"}
    for c in r.columns:
        t.add_column(f"{names.get(c, c)} r", justify="right")
        t.add_column(f"{names.get(c, c)} RMSE", justify="right")
    if scale is not None:
        t.add_column("on scale", justify="right")
    for model in r.index:
        cells = [f"{v:.3f}" for c in r.columns for v in (r.at[model, c], rmse.at[model, c])]
        cells = [c if i % 2 == 0 else c[:-1] for i, c in enumerate(cells)]  # RMSE to 2 decimals
        if scale is not None:
            cells.append(f"{scale.loc[model].mean():.0%}")
        t.add_row(model, *cells)
    console.print(t)
    console.print(f"results: {workdir / 'results' / 'latest'}", soft_wrap=True)
    browse = f"mdlda ui --workdir {workdir}" if uri.startswith("sqlite") else uri
    run = f"the chain's run {run_id}, " if run_id else ""
    console.print(f"MLflow ({run}every stage and trial nested in it, the registry): {browse}", soft_wrap=True)
    made = ", ".join(f"{name} {u}" for name, u in (models or {}).items() if u != f"models:/{STUDENT_MODEL}@champion")
    console.print(
        f"registered models: {made or '-'}; the champion student: models:/{STUDENT_MODEL}@champion", soft_wrap=True
    )
