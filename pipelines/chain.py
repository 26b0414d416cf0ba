"""`mdlda run` / `make demo`: the whole chain, resumable stage by stage.

prepare -> baselines -> teachers -> select -> pseudo-label -> student -> evaluation summary. One MLflow parent run
per chain config (found again by its digest on a rerun), one nested run per stage. A stage whose outputs exist
and match is skipped, so rerunning a finished chain does no work; a killed chain continues where it stopped.
Each stage's work and bookkeeping is in its own module; the chain orders them and reports what each did.
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
from mdlda.tracking import CHAMPION, STUDENT_MODEL, setup_tracking, tracking_uri
from pipelines import runs, sweep_stage
from pipelines.preflight import check_durability
from pipelines.prepare_stage import ChainInputs, load_inputs, prepare_stage
from pipelines.raysetup import init_ray
from pipelines.summary import print_rerun, print_selection, print_summary, up_to_date

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


class Chain:
    """One chain config + workdir: its MLflow parent run, its shards and the stages, callable one by one.

    ``mdlda run`` calls every stage in order; ``mdlda teachers`` / ``pseudolabel`` / ``student`` / ``evaluate``
    call one stage on the outputs earlier stages left in the workdir.
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
        setup_file_logging(self.workdir)  # size-capped (mdlda/logs.py)
        self.uri = tracking_uri(self.workdir)
        init_ray(address, quiet=not verbose)  # quiet: workers' output stays in Ray's logs, not on this console
        # a multi-node run refuses storage that dies with a node (pipelines/preflight.py)
        check_durability(self.workdir, self.uri, MlflowClient().get_experiment(self.exp_id).artifact_location)
        self.key = config_digest({"cfg": identity(cfg), "workdir": str(self.workdir)})
        self.parent = runs.parent_run(self.exp_id, self.key, cfg)
        self.ctx = runs.StageContext(self.workdir, cfg.experiment, self.exp_id, self.uri, self.parent, self.key)
        self.result = ChainResult(str(self.workdir), self.uri, self.parent)
        self._data: ChainInputs | None = None
        self.models: dict[str, str] = {}
        self.pseudo_name = "pseudolabels"  # shards/<name>: the ablation gives every seed its own

    def say(self, msg: str) -> None:
        m, sec = divmod(int(time.monotonic() - self.started), 60)
        self.console.print(f"[dim]{m:02d}:{sec:02d}[/] {msg}", soft_wrap=True)  # one line each, also in a log file
        logger.info("%s", Text.from_markup(msg).plain)  # and in mdlda.log

    def shards(self, name: str) -> Path:
        return self.ctx.shards(name)

    @property
    def data(self) -> ChainInputs:
        """Source/target datasets, front-end statistics and their digest (loaded once; refuses missing or foreign
        shards)."""
        if self._data is None:
            self._data = load_inputs(self.cfg, self.workdir, self.say)
        return self._data

    # -------------------------------------------------------------------------------------------- stages
    def prepare(self, data_root: str | Path) -> None:
        res = prepare_stage(self.cfg, Path(data_root).resolve(), self.ctx)
        self.result.did_work["prepare"] = res.did_work
        self.say(
            f"prepare: midlevel {res.midlevel.manifest['counts']}, maestro {res.maestro.manifest['rows']} segments"
            + ("" if res.did_work else " (up to date)")
        )

    def sweep(self, sweep: SweepConfig, baseline: bool) -> list[dict]:
        res = sweep_stage.sweep_stage(sweep, baseline, self.data, self.ctx)
        self.result.did_work[sweep_stage.stage_name(sweep, baseline)] = res.did_work
        return res.chosen

    def baselines(self) -> None:
        for sweep in self.cfg.baselines:
            chosen = self.sweep(sweep, baseline=True)
            self.models[sweep.name] = chosen[0]["uri"]
            self.say(
                f"baseline {sweep.name}: best valid r {float(chosen[0]['val_r_mean']):.3f} -> {chosen[0]['uri']}"
                + up_to_date(self.result.did_work[f"baseline:{sweep.name}"])
            )

    def teachers(self) -> None:
        teachers = self.sweep(self.cfg.teachers, baseline=False)
        self.result.teachers = teachers
        for t in teachers:
            self.models[f"teacher-{t['rank']}"] = t["uri"]
        self.say(
            f"teachers: {len(teachers)} selected: "
            + ", ".join(f"{t['uri']} (r {float(t['val_r_mean']):.3f})" for t in teachers)
            + up_to_date(self.result.did_work["teachers"])
        )

    def pseudolabel(self) -> None:
        from pipelines.pseudolabel import pseudolabel_stage

        inputs = self.data
        teachers = self.result.teachers or self.teachers_registered()
        uris = [t["uri"] for t in teachers]
        pl = pseudolabel_stage(self.cfg, uris, self.shards(self.pseudo_name), inputs, self.ctx)
        self.result.did_work["pseudolabel"] = not pl.skipped_work
        self.say(
            f"pseudolabel: {pl.manifest['rows']} MAESTRO segments labelled by the teachers' mean"
            + up_to_date(self.result.did_work["pseudolabel"])
        )

    def student(self) -> None:
        from pipelines.student_stage import student_stage

        res = student_stage(self.cfg, self.shards(self.pseudo_name), self.data, self.ctx)
        student = res.info
        self.result.did_work["student"] = res.did_work
        self.result.student = student
        self.models["student"] = student["uri"]
        self.say(
            f"student: {student['uri']} valid r {float(student['val_r_mean']):.3f}"
            + (" (champion)" if student.get("champion") else "")  # not "[champion]": rich reads that as markup
            + up_to_date(res.did_work)
        )

    def evaluate(self, models: dict[str, str] | None = None) -> None:
        from pipelines.evaluate import evaluate_stage

        models = models or self.models
        teachers = [m for m in models if m.startswith("teacher-")]
        ensembles = {"teacher-ensemble": teachers} if len(teachers) > 1 else {}
        adabn = [b.name for b in self.cfg.baselines if b.name in models]  # the bar DA has to clear
        res = evaluate_stage(models, ensembles, adabn, self.cfg, self.ctx)
        self.result.did_work["evaluate"] = res.did_work
        self.result.summary = res.table
        print_summary(self.console, res.table, self.workdir, self.uri, models, self.parent)

    def select_only(self, sweep: SweepConfig, baseline: bool) -> list[dict]:
        """Rank a finished sweep from its storage folder (no training) and register/print the same top-k."""
        inputs = self.data
        selection = sweep_stage.select_stage(sweep, baseline, inputs, self.ctx)
        print_selection(self.console, sweep_stage.sweep_name(sweep, inputs.digest), sweep, selection)
        return selection.registered

    def rerun(self, sweep: SweepConfig, baseline: bool, trial_id: str):
        """Train one trial of this chain's stored sweep again from its recorded config and compare its
        per-epoch validation scores with the logged ones (a nested MLflow run under the sweep's stage run)."""
        from pipelines.rerun import RERUN_TOLERANCE

        inputs = self.data
        res = sweep_stage.rerun_stage(sweep, baseline, trial_id, inputs, self.ctx)
        print_rerun(self.console, sweep_stage.sweep_name(sweep, inputs.digest), sweep.metric, res)
        verdict = "matches" if res.matches else "DOES NOT match"
        self.say(
            f"rerun {verdict} the logged scores (max |diff| {res.max_abs_diff:.2e}, tolerance {RERUN_TOLERANCE:g})"
        )
        return res

    def registered_models(self) -> dict[str, str]:
        """name -> URI of this chain's registered baselines, teachers and champion student."""
        out = {}
        for sweep in self.cfg.baselines:
            found = sweep_stage.registered(sweep, True, self.data, self.ctx)
            if found:
                out[sweep.name] = found[0]["uri"]
        for t in self.teachers_registered():
            out[f"teacher-{t['rank']}"] = t["uri"]
        out["student"] = f"models:/{STUDENT_MODEL}@{CHAMPION}"
        return out

    def teachers_registered(self) -> list[dict]:
        """The teachers this chain's sweep registered (for a pseudo-label stage run on its own)."""
        found = sweep_stage.registered(self.cfg.teachers, False, self.data, self.ctx)
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
    """Every stage in order; a stage whose outputs exist and match does no work."""
    chain = Chain(cfg, workdir, address, console, verbose)
    chain.say(f"[bold]mdlda chain[/] {chain.key} — MLflow run {chain.parent} in {chain.uri}")
    chain.prepare(data_root)
    chain.baselines()
    chain.teachers()
    chain.pseudolabel()
    chain.student()
    chain.evaluate()
    runs.finish_parent(chain.parent, chain.result.student.get("uri", ""))
    return chain.result
