"""`mdlda compare A B [C ...]` and `mdlda compare-demo`: performances of one piece side by side.

:func:`register` adds both commands to a Typer app (:mod:`pipelines.cli` calls it); the work is in :mod:`mdlda.compare`
(alignment in :mod:`mdlda.align`, outputs in :mod:`mdlda.compare_report`). Bad input is refused in one
``error:`` line before MLflow starts: fewer than two files, a missing or undecodable file, a bad option, a workdir
without an MLflow store; a model the store does not hold is refused before any audio is decoded.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console()
DEFAULT_MODEL = "models:/mdlda-student@champion"


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)  # one line, never wrapped
    raise typer.Exit(code=1)


def _check_audio(audio: list[Path]) -> None:
    """Two or more files, each present and decodable (its header is read; nothing is decoded yet)."""
    import soundfile as sf

    if len(audio) < 2:
        got = f": {audio[0]}" if audio else ""
        _fail(
            f"compare needs at least two performances of the same piece (the reference first), got {len(audio)}"
            f"{got}. For the curves of one file use `mdlda predict`."
        )
    for path in audio:
        if not path.is_file():
            _fail(f"{path}: {'is a directory, not an audio file' if path.is_dir() else 'not found'}")
        if path.stat().st_size == 0:
            _fail(f"{path}: file is empty (0 bytes)")
        try:
            sf.info(str(path))
        except Exception as exc:  # libsndfile's errors for unknown formats and corrupt headers
            _fail(f"{path}: cannot decode ({' '.join(str(exc).split())})")


def _read_bars(path: Path | None):
    if path is None:
        return None
    import numpy as np

    try:
        bars = np.atleast_1d(np.loadtxt(path, dtype=np.float64, delimiter=",", ndmin=1, comments="#"))
    except (OSError, ValueError) as exc:
        _fail(f"{path}: cannot read bar times ({exc}); expected one start time in seconds per line")
    if bars.ndim != 1 or len(bars) == 0 or not np.all(np.diff(bars) > 0) or bars[0] < 0:
        _fail(f"{path}: bar times must be one increasing list of seconds >= 0, one per line")
    return bars


def compare(
    audio: list[Path] = typer.Argument(
        None,
        help="Two or more recordings of one piece (wav, flac, mp3, ...; any length and rate); the first is the "
        "reference.",
    ),
    model: str = typer.Option(
        DEFAULT_MODEL, help="MLflow model URI (registry name@alias, name/version, or runs:/...)."
    ),
    workdir: Path = typer.Option(
        Path("work"),
        help="Workdir whose embedded MLflow store holds the registry (ignored with --tracking-uri or "
        "MLFLOW_TRACKING_URI).",
    ),
    tracking_uri: str | None = typer.Option(
        None,
        help="MLflow tracking URI (a server or sqlite:///...); default: MLFLOW_TRACKING_URI, else the workdir's store.",
    ),
    out: Path = typer.Option(Path("compare"), help="Folder for the figure (PNG, SVG), the CSV tables and summary.md."),
    hop: float = typer.Option(5.0, help="Seconds between 15-s window starts (the curves' resolution)."),
    min_diff: float = typer.Option(0.5, help="A passage differs by at least this many rating points in one feature."),
    passages: int = typer.Option(10, help="How many ranked passages to report."),
    bars: Path | None = typer.Option(None, help="Text file of the reference's bar start times (s), one per line."),
    min_seconds: float = typer.Option(
        5.0, help="Audio shorter than one 15-s window is zero-padded if at least this long, refused otherwise."
    ),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    seed: int = typer.Option(0, help="Seed of the bootstrap intervals."),
) -> None:
    """Compare performances of one piece: align them to the first (chroma DTW), predict the 7 features over time,
    and report where and how much they differ (figure, CSVs, Markdown summary)."""
    audio = list(audio or [])
    if batch_size < 1:
        _fail(f"--batch-size must be at least 1 window per forward pass, got {batch_size}")
    if hop <= 0:
        _fail(f"--hop must be > 0 seconds between window starts, got {hop:g}")
    if min_diff <= 0 or passages < 0:
        _fail(f"--min-diff must be > 0 and --passages >= 0, got {min_diff:g} and {passages}")
    _check_audio(audio)
    bar_times = _read_bars(bars)
    from mdlda.tracking import tracking_override

    uri = tracking_uri or tracking_override()
    if not uri and not (workdir / "mlflow.db").is_file():
        _fail(
            f"{workdir / 'mlflow.db'} does not exist: {workdir} holds no MLflow store. Pass the --workdir of a chain "
            "(`mdlda run` writes the store there) or --tracking-uri."
        )
    from mdlda.audio import AudioError
    from mdlda.compare import compare as run_compare
    from mdlda.ood import warning_text
    from mdlda.served import load_served_with_ood
    from mdlda.tracking import TrackingError, use_tracking

    use_tracking(workdir, uri)
    try:
        served, ood = load_served_with_ood(model)
    except TrackingError as exc:
        _fail(f"{exc}. Registered models are listed by `mlflow ui` or MlflowClient().search_registered_models().")
    if ood is None:
        console.print(f"note: {model} carries no training-data statistics, so no OOD scores (docs/serving.md)")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"predicting + chroma: {audio[0].name}", total=len(audio))

        def done(name: str) -> None:
            progress.update(task, advance=1, description=f"done: {name}")

        try:
            result = run_compare(
                served, audio, out, hop_s=hop, batch_size=batch_size, min_seconds=min_seconds, min_diff=min_diff,
                top=passages, seed=seed, bars=bar_times, model_uri=model, on_done=done, ood=ood,
            )  # fmt: skip
        except (AudioError, ValueError) as exc:
            _fail(str(exc))
    console.print(result.files["summary"].read_text(), markup=False, highlight=False, soft_wrap=True)
    if result.ood is not None:
        t = result.ood
        text = warning_text(int(t.flagged.sum()), int(t.windows.sum()), float(t.max_score.max()), ood.threshold)
        if text:
            console.print(f"[bold yellow]warning:[/] {text} (ood.csv; docs/serving.md)", soft_wrap=True)
    for kind, path in result.files.items():
        console.print(f"{kind}: {path}", soft_wrap=True)


def compare_demo(
    out: Path = typer.Option(..., help="Folder to write the generated performances and time_maps.csv into."),
    seed: int = typer.Option(0, help="Random seed: the same seed writes identical files."),
    seconds: float = typer.Option(60.0, help="Length of the reference performance in seconds (>= 20)."),
) -> None:
    """Generate three piano performances of one piece with known differences (tempo maps, a detached passage)."""
    from mdlda.datasets.performances import generate_performances

    try:
        made = generate_performances(out, seed=seed, seconds=seconds)
    except ValueError as exc:
        _fail(str(exc))
    files = list(made["files"].values())
    print(json.dumps({"files": files, "bars": made["bars"], "detached_s": list(made["detached"])}, indent=1))
    console.print(f"next: mdlda compare {' '.join(files)} --bars {made['bars']} --out {Path(out) / 'compare'}")


def register(app: typer.Typer) -> None:
    """Add `compare` and `compare-demo` to ``app``."""
    app.command("compare")(compare)
    app.command("compare-demo")(compare_demo)
