"""`mdlda conespressione` and `mdlda conespressione-demo`: the downstream check of the paper's section 5.

:func:`register` adds both commands to a Typer app (:mod:`pipelines.cli` calls it); the work is in
:mod:`mdlda.conespressione` and :mod:`mdlda.datasets.conespressione`.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
DEFAULT_MODEL = "student=models:/mdlda-student@champion"


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=1)


def parse_models(items: list[str]) -> dict[str, str]:
    """``["NAME=URI", "URI", ...]`` -> ``{name: uri}`` (a bare URI is its own name); names must be unique."""
    chosen: dict[str, str] = {}
    for item in items:
        name, sep, uri = item.partition("=")
        if not sep:
            name, uri = item, item
        name, uri = name.strip(), uri.strip()
        if not name or not uri:
            raise ValueError(f"--model {item!r}: expected NAME=URI, e.g. {DEFAULT_MODEL}")
        if name in chosen:
            raise ValueError(f"--model name {name!r} given twice")
        chosen[name] = uri
    return chosen


def _print_skipped(skipped: list[dict], listed_in: Path | None = None) -> None:
    if skipped:
        where = f" (listed in {listed_in})" if listed_in else ""
        console.print(f"[yellow]{len(skipped)} item(s) skipped[/]{where}:")
        for s in skipped[:10]:
            console.print(f"  {s['item']}: {s['reason']}")


def _print_results(result: dict) -> None:
    reg = result["regression"]
    table = Table(title="linear regression: 7 time-averaged features -> dimension (R2)")
    for col in ("model", "dimension", "n", "pieces", "R2 in sample", "R2 CV (by piece)"):
        table.add_column(col, justify="left" if col in ("model", "dimension") else "right")
    for rec in reg.itertuples(index=False):
        table.add_row(
            rec.model, rec.dimension, str(rec.n), str(rec.pieces), f"{rec.r2_in_sample:.3f}", f"{rec.r2_cv:.3f}"
        )
    console.print(table)
    corr = result["correlations"]
    sig = corr[corr["significant"]]
    table = Table(title="significant correlations (p < 0.05, |r| > 0.2)")
    for col in ("model", "dimension", "feature", "r", "p"):
        table.add_column(col, justify="right" if col in ("r", "p") else "left")
    for rec in sig.sort_values(["model", "dimension"]).itertuples(index=False):
        table.add_row(rec.model, rec.dimension, rec.feature.replace("_", " "), f"{rec.r:+.3f}", f"{rec.p:.3g}")
    if sig.empty:
        console.print("[yellow]no feature-dimension pair has p < 0.05 and |r| > 0.2[/]")
    else:
        console.print(table)
    _print_skipped(result["skipped"], result["paths"]["skipped"])
    for key, path in result["paths"].items():
        console.print(f"{key}: {path}")


def _log_to_mlflow(workdir: Path, experiment: str, result: dict, params: dict) -> str:
    import mlflow

    from mdlda.tracking import setup_tracking

    setup_tracking(workdir, experiment)
    with mlflow.start_run(run_name="conespressione") as run:
        mlflow.log_params(params)
        for rec in result["regression"].itertuples(index=False):
            mlflow.log_metric(f"{rec.model}.{rec.dimension}.r2_in_sample", rec.r2_in_sample)
            mlflow.log_metric(f"{rec.model}.{rec.dimension}.r2_cv", rec.r2_cv)
        for model, g in result["correlations"].groupby("model"):
            mlflow.log_metric(f"{model}.significant_pairs", int(g["significant"].sum()))
        mlflow.log_artifacts(str(result["paths"]["features"].parent), artifact_path="conespressione")
        return run.info.run_id


def conespressione(
    audio_dir: Path = typer.Argument(
        ..., help="Folder of performance audio (wav/flac/mp3, searched recursively); file stem = performance_name."
    ),
    dims: Path = typer.Option(
        ..., "--dims", help="CSV with performance_name, piece_name, dim_1..dim_4 (see docs/conespressione.md)."
    ),
    piece_pattern: str | None = typer.Option(
        None,
        help="Regex finding the piece in performance_name (group 'piece' or the first group); "
        "only for a CSV without a piece_name column.",
    ),
    model: list[str] = typer.Option(
        [DEFAULT_MODEL],
        "--model",
        help="NAME=URI of a served model (registry name@alias, name/version, runs:/...); repeatable.",
    ),
    workdir: Path = typer.Option(
        Path("work"),
        help="Workdir whose embedded MLflow store holds the registry (ignored when MLFLOW_TRACKING_URI is set).",
    ),
    out: Path | None = typer.Option(
        None, help="Output folder for the tables and figure (default: WORKDIR/conespressione)."
    ),
    hop: float = typer.Option(15.0, help="Seconds between window starts (15 = non-overlapping)."),
    min_seconds: float = typer.Option(
        5.0, help="Audio shorter than one 15-s window is zero-padded if at least this long, skipped otherwise."
    ),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    log_to_mlflow: bool = typer.Option(False, help="Also log the outputs and R2s as a new MLflow run."),
    experiment: str = typer.Option("conespressione", help="MLflow experiment for --log-to-mlflow."),
) -> None:
    """Con Espressione check: time-averaged features vs 4 expressive dimensions (R2, Pearson r; paper section 5)."""
    from mdlda.conespressione import ConEspressioneError, analyse, check_groups
    from mdlda.datasets.common import DatasetFormatError
    from mdlda.datasets.conespressione import match_audio, read_dimensions

    try:
        uris = parse_models(model)
        items, skipped = match_audio(audio_dir, read_dimensions(dims, piece_pattern))
    except (ValueError, DatasetFormatError) as exc:
        _fail(str(exc))
    try:
        check_groups(items)
    except ConEspressioneError as exc:
        _print_skipped(skipped)
        _fail(str(exc))
    # after the checks: a bad CSV fails fast, without importing mlflow and torch
    from mdlda.tracking import TrackingError, load_served, use_tracking

    use_tracking(workdir)
    served = {}
    for name, uri in uris.items():
        try:
            served[name] = load_served(uri)
        except TrackingError as exc:
            _fail(f"{exc}. Registered models are listed by `mlflow ui` or MlflowClient().search_registered_models().")
    out = out or workdir / "conespressione"
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("predicting", total=len(served) * len(items))

        def done(model_name: str, performance: str) -> None:
            progress.update(task, advance=1, description=f"{model_name}: {performance}")

        try:
            result = analyse(served, items, out, skipped, hop, batch_size, min_seconds, on_done=done)
        except ConEspressioneError as exc:
            _fail(str(exc))
    _print_results(result)
    if log_to_mlflow:
        params = {
            "models": json.dumps(uris),
            "dims_csv": str(dims),
            "audio_dir": str(audio_dir),
            "performances": len(result["features"]["performance_name"].unique()),
            "pieces": int(result["regression"]["pieces"].iloc[0]),
            "hop_s": hop,
            "skipped": len(result["skipped"]),
        }
        try:
            run_id = _log_to_mlflow(workdir, experiment, result, params)
        except TrackingError as exc:
            _fail(str(exc))
        console.print(f"MLflow run: {run_id} (experiment {experiment!r})")


def conespressione_demo(
    out: Path = typer.Option(..., help="Folder to write audio/ and dimensions.csv into."),
    seed: int = typer.Option(0, help="Random seed: the same seed writes identical files."),
    pieces: int = typer.Option(4, help="Number of pieces (2..6)."),
    performers: int = typer.Option(4, help="Performances per piece (1..6)."),
) -> None:
    """Generate a tiny Con Espressione set (piano WAVs + dimensions CSV) whose dimensions are measured audio
    properties."""
    from mdlda.datasets.conespressione import generate_conespressione_demo

    try:
        summary = generate_conespressione_demo(out, seed=seed, pieces=pieces, performers=performers)
    except ValueError as exc:
        _fail(str(exc))
    console.print_json(json.dumps(summary))
    console.print(f"next: mdlda conespressione {summary['audio_dir']} --dims {summary['dims_csv']} --model NAME=URI")


def register(app: typer.Typer) -> None:
    """Add `conespressione` and `conespressione-demo` to ``app``."""
    app.command("conespressione")(conespressione)
    app.command("conespressione-demo")(conespressione_demo)
