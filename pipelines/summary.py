"""What the chain prints besides its one line per stage: the evaluation summary, a ``--select-only`` selection and
a ``--rerun`` comparison, as rich tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from mdlda.tracking import CHAMPION, STUDENT_MODEL


def up_to_date(worked: bool) -> str:
    """The suffix of a stage line whose outputs existed and matched (a rerun skipped the stage's work)."""
    return "" if worked else " (up to date: nothing redone)"


def print_selection(console: Console, name: str, sweep, selection) -> None:
    """The top k of the stored sweep ``name`` (config ``sweep``) with their registered versions (a
    ``sweep_stage.Selection``)."""
    t = Table(title=f"{name}: top {sweep.top_k} by {sweep.metric}")
    for c in ("rank", "trial_id", "score", "valid_loss", "best_epoch", "version"):
        t.add_column(c)
    for row, reg in zip(selection.chosen.itertuples(), selection.registered, strict=True):
        t.add_row(
            str(row.rank),
            row.trial_id,
            f"{row.score:.4f}",
            f"{row.valid_loss:.4f}",
            str(row.best_epoch),
            reg["uri"],
        )
    console.print(t)


def print_rerun(console: Console, name: str, metric: str, res) -> None:
    """A rerun's per-epoch ``metric`` beside the logged one (a ``teachers.RerunResult``)."""
    t = Table(title=f"rerun of {res.trial_id} ({name}): {metric} per epoch")
    for c in ("epoch", "logged", "rerun", "|diff|"):
        t.add_column(c, justify="right")
    for row in res.comparison.itertuples():
        t.add_row(str(row.epoch), f"{row.logged:.6f}", f"{row.rerun:.6f}", f"{row.abs_diff:.2e}")
    console.print(t)


def print_summary(
    console: Console,
    table: pd.DataFrame,
    workdir: Path,
    uri: str,
    models: dict[str, str] | None = None,
    run_id: str | None = None,
) -> None:
    """The evaluation's mean r / RMSE table, where the results and the MLflow records are, the registered models."""
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
    champion = f"models:/{STUDENT_MODEL}@{CHAMPION}"
    made = ", ".join(f"{name} {u}" for name, u in (models or {}).items() if u != champion)
    console.print(f"registered models: {made or '-'}; the champion student: {champion}", soft_wrap=True)
