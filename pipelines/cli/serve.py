"""`mdlda predict` and `mdlda lineage`: what a registered model says about audio files, and the chain that made it.
:func:`register` adds them to a Typer app; the work is in :mod:`mdlda.predict` and :mod:`mdlda.lineage`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pipelines.cli.common import console, fail


def predict(
    audio: list[Path] = typer.Argument(..., help="Audio files (wav, flac, mp3, ...; any length and sample rate)."),
    model: str = typer.Option(
        "models:/mdlda-student@champion", help="MLflow model URI (registry name@alias, name/version, or runs:/...)."
    ),
    workdir: Path = typer.Option(
        Path("work"),
        help="Workdir whose embedded MLflow store holds the registry (ignored when MLFLOW_TRACKING_URI is set).",
    ),
    hop: float = typer.Option(15.0, help="Seconds between window starts (15 = non-overlapping)."),
    min_seconds: float = typer.Option(
        5.0, help="Audio shorter than one 15-s window is zero-padded if at least this long, refused otherwise."
    ),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    out: str = typer.Option("-", help="Per-window predictions: a .csv or .json path, or - for CSV on stdout."),
    plot: Path | None = typer.Option(None, help="Write a PNG of the 7 feature curves over time."),
) -> None:
    """Predict the 7 mid-level features (1..10) of audio files, per 15-s window and time-averaged; with each
    window's distance from the training data (ood_score, ood_flag) when the model carries its statistics."""
    import sys

    import pandas as pd

    from mdlda.audio import AudioError
    from mdlda.ood import warning
    from mdlda.predict import plot_curves, predict_recording, time_average
    from mdlda.served import load_served_with_ood
    from mdlda.tracking import TrackingError, use_tracking

    if batch_size < 1:  # checked before the model is loaded
        fail(f"--batch-size must be at least 1 window per forward pass, got {batch_size}")
    if hop <= 0:
        fail(f"--hop must be > 0 seconds between window starts, got {hop:g}")
    for path in audio:
        if not path.is_file():
            what = "is a directory, not an audio file" if path.is_dir() else "not found"
            fail(f"{path}: {what}")
    use_tracking(workdir)
    try:
        served, ood = load_served_with_ood(model)
    except TrackingError as exc:
        fail(f"{exc}. Registered models are listed by `mlflow ui` or MlflowClient().search_registered_models().")
    err = Console(stderr=True)
    if ood is None:
        err.print(f"note: {model} carries no training-data statistics, so no ood_score column (docs/serving.md)")
    frames = []
    for path in audio:
        try:
            frames.append(
                predict_recording(served, path, hop_s=hop, batch_size=batch_size, min_seconds=min_seconds, ood=ood)
            )
        except (AudioError, ValueError) as exc:
            fail(str(exc))
    frame = pd.concat(frames, ignore_index=True)
    if out == "-":
        frame.to_csv(sys.stdout, index=False, float_format="%.3f")
    elif out.endswith(".json"):
        Path(out).write_text(frame.to_json(orient="records", indent=1))
    else:
        frame.to_csv(out, index=False, float_format="%.4f")
    avg = time_average(frame)
    table = Table(title=f"time-averaged features ({model})")
    table.add_column("file")
    for f in avg.columns[1:]:
        table.add_column(f.replace("_", " "), justify="right")
    for row in avg.itertuples(index=False):
        table.add_row(Path(row[0]).name, *[f"{v:.2f}" for v in row[1:]])
    err.print(table)
    if ood is not None and (text := warning(frame["ood_score"].to_numpy(), ood)):
        err.print(f"[bold yellow]warning:[/] {text} (ood_flag column; docs/serving.md)", soft_wrap=True)
    if plot is not None:
        err.print(f"plot: {plot_curves(frame, plot)}")


def lineage(
    model: str = typer.Argument("models:/mdlda-student@champion", help="models:/NAME@ALIAS or models:/NAME/VERSION"),
    workdir: Path = typer.Option(
        Path("work"), help="Workdir whose embedded MLflow store holds the registry (ignored with MLFLOW_TRACKING_URI)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the lineage as JSON instead of a tree."),
) -> None:
    """The chain that made a registered model: shard manifests (digests), sweep, teachers, pseudo-labels, runs.

    Every link is resolved against the tracking store; the command exits with 1 when one does not resolve.
    """
    from mdlda.lineage import LineageError, render, trace
    from mdlda.tracking import use_tracking

    use_tracking(workdir)
    try:
        tree = trace(model)
    except LineageError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(tree.to_dict(), indent=1))
    else:
        console.print(render(tree))
    broken = tree.broken()
    if broken:
        fail(f"{len(broken)} link(s) do not resolve: " + "; ".join(f"{b.role} {b.ref}: {b.detail}" for b in broken))


def register(app: typer.Typer) -> None:
    """Add `predict` and `lineage` to ``app``."""
    app.command()(predict)
    app.command()(lineage)
