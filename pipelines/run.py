"""`mdlda run` / `make demo`: the whole chain, resumable stage by stage.

prepare -> baselines -> teachers -> select -> pseudo-label -> student -> evaluation summary. One MLflow parent run
per chain config (found again by its digest on a rerun), one nested run per stage. A stage whose outputs exist
and match is skipped, so rerunning a finished chain does no work; a killed chain continues where it stopped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from mdlda.config import ChainConfig, SweepConfig, config_digest
from mdlda.tracking import STUDENT_MODEL, setup_tracking, tracking_uri
from pipelines import stages
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
    return f"{sweep.name}-{config_digest({'sweep': sweep.model_dump(mode='json'), 'data': data_digest})[:8]}"


def run_chain(cfg: ChainConfig, data_root: str | Path, workdir: str | Path, address: str | None = None,
              console: Console | None = None) -> ChainResult:
    console = console or Console()
    workdir = Path(workdir).resolve()
    data_root = Path(data_root).resolve()
    exp_id = setup_tracking(workdir, cfg.experiment)  # fail fast, before any compute
    uri = tracking_uri(workdir)
    init_ray(address)
    key = config_digest({"cfg": cfg.model_dump(mode="json"), "data": str(data_root)})
    parent = stages.parent_run(exp_id, key, cfg)
    result = ChainResult(str(workdir), uri, parent)
    say = console.print

    say(f"[bold]mdlda chain[/] {key} — MLflow run {parent} in {uri}")
    with stages.stage(exp_id, parent, "prepare") as run:
        ml, ma = stages.prepare_all(cfg, data_root, workdir, run)
        result.did_work["prepare"] = not (ml.skipped_work and ma.skipped_work)
        say(f"prepare: midlevel {ml.manifest['counts']}, maestro {ma.manifest['rows']} segments"
            + (" (up to date)" if not result.did_work["prepare"] else ""))
    data = stages.stage_data(cfg, ml.out, ma.out)
    fstats = stages.frontend_stats_for(ml.out, data, workdir)
    data_digest = ml.manifest["content_digest"] + ma.manifest["content_digest"]

    models: dict[str, str] = {}
    for sweep in cfg.baselines:
        name = sweep_name(sweep, data_digest)
        with stages.stage(exp_id, parent, f"baseline:{sweep.name}") as run:
            chosen, worked = stages.sweep_and_select(sweep, name, data, fstats, workdir, cfg.experiment, exp_id,
                                                     run, uri, k=1, registered_model="mdlda-baseline")
        result.did_work[f"baseline:{sweep.name}"] = worked
        models[sweep.name] = chosen[0]["uri"]
        say(f"baseline {sweep.name}: best valid r {float(chosen[0]['val_r_mean']):.3f} -> {chosen[0]['uri']}")

    name = sweep_name(cfg.teachers, data_digest)
    with stages.stage(exp_id, parent, "teachers") as run:
        teachers, worked = stages.sweep_and_select(cfg.teachers, name, data, fstats, workdir, cfg.experiment,
                                                   exp_id, run, uri, k=cfg.teachers.top_k)
    result.did_work["teachers"] = worked
    result.teachers = teachers
    for t in teachers:
        models[f"teacher-{t['rank']}"] = t["uri"]
    say(f"teachers: {len(teachers)} selected: " + ", ".join(f"{t['uri']} (r {float(t['val_r_mean']):.3f})"
                                                            for t in teachers))

    with stages.stage(exp_id, parent, "pseudolabel") as run:
        pl = stages.pseudolabel_stage(cfg, [t["uri"] for t in teachers], ma.out, workdir, data, uri, run)
    result.did_work["pseudolabel"] = not pl.skipped_work
    say(f"pseudolabel: {pl.manifest['rows']} MAESTRO segments labelled by the teachers' mean")

    with stages.stage(exp_id, parent, "student") as run:
        student, worked = stages.student_stage(cfg, ml.out, pl.out, fstats, workdir, key, run, data)
    result.did_work["student"] = worked
    result.student = student
    models["student"] = student["uri"]
    say(f"student: {student['uri']} valid r {float(student['val_r_mean']):.3f}"
        + (" [champion]" if student.get("champion") else ""))

    with stages.stage(exp_id, parent, "evaluate") as run:
        ensembles = {"teacher-ensemble": [f"teacher-{t['rank']}" for t in teachers]}
        table, worked = stages.evaluate_stage(models, ensembles, ml.out, workdir, run)
    result.did_work["evaluate"] = worked
    result.summary = table
    stages.finish_parent(parent, result)
    _print_summary(console, table, workdir, uri)
    return result


def _print_summary(console: Console, table: pd.DataFrame, workdir: Path, uri: str) -> None:
    from rich.table import Table

    from pipelines.evaluate import summary_pivot

    pivot = summary_pivot(table)
    t = Table(title="mean Pearson r on the test splits (1..10 scale predictions)")
    t.add_column("model")
    names = {"test": "non-piano test", "piano_test": "piano test"}
    for c in pivot.columns:
        t.add_column(names.get(c, c), justify="right")
    for model, row in pivot.iterrows():
        t.add_row(model, *[f"{v:.3f}" for v in row])
    console.print(t)
    console.print(f"results: {workdir / 'results'}")
    backend = uri if not uri.startswith("sqlite") else uri
    console.print(f"MLflow runs: mlflow ui --backend-store-uri {backend}")
    console.print(f"models: models:/{STUDENT_MODEL}@champion, models:/mdlda-teacher/<version>")


def load_summary(workdir: str | Path) -> dict[str, Any]:
    path = Path(workdir) / "results" / "chain.json"
    return json.loads(path.read_text()) if path.exists() else {}
