"""The `mdlda` command line: one subcommand per stage. It only parses options and dispatches to the stages."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="mdlda: mid-level perceptual features of music, adapted to solo piano (Ray + MLflow).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()

from pipelines.cli.prepare import register as _register_prepare  # noqa: E402

_register_prepare(app)  # demo-data and prepare first: the order of `mdlda --help`


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)  # one line, never wrapped
    raise typer.Exit(code=1)


VERBOSE_OPT = typer.Option(
    False, "--verbose", help="Show what Ray, Tune and MLflow print here (otherwise in WORKDIR/logs/libraries.log)."
)


@contextmanager
def _console(workdir: Path, verbose: bool):
    """The command's console: mdlda's lines (live tables on a terminal), the other libraries' output in
    ``workdir``/logs (:mod:`mdlda.console`)."""
    from mdlda.console import command_console

    with command_console(console, workdir, verbose):
        yield


@contextmanager
def _locked(folder: Path):
    """Hold ``folder``'s one-writer lock for the command (:mod:`mdlda.lock`): a second command writing there exits
    at once with code 1, naming the holder."""
    from mdlda.lock import LockHeld, workdir_lock

    try:
        with workdir_lock(folder):
            yield
    except LockHeld as exc:
        _fail(str(exc))


@app.command()
def run(
    config: Path = typer.Option(Path("tune_spaces/demo.yaml"), help="Chain config YAML (tune_spaces/)."),
    data: Path = typer.Option(..., help="Data root holding the Mid-level and MAESTRO folders named in the config."),
    workdir: Path = typer.Option(Path("work"), help="Where shards, Ray results, the MLflow store and results go."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a config key, e.g. --set teachers.num_samples=8 (repeatable)."
    ),
    address: str | None = typer.Option(None, help="Ray address ('auto' for a running cluster); local Ray if unset."),
    time_budget: float | None = typer.Option(None, help="Teacher sweep: stop launching trials after SECONDS."),
    max_trials: int | None = typer.Option(None, help="Teacher sweep: stop launching trials after N in total."),
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Run the whole chain: prepare, baselines, teachers, selection, pseudo-labels, student, evaluation.

    Resumable stage by stage: rerunning the same command skips every stage whose outputs exist and match.
    """
    from mdlda.config import ConfigError, load_chain_config
    from mdlda.datasets.inputs import check_chain_inputs

    with _locked(workdir):  # first: a second writer on the workdir is refused before any other work
        try:
            cfg = with_budget(load_chain_config(config, set_), time_budget, max_trials, baseline=False)
        except ConfigError as exc:
            _fail(str(exc))
        _check_inputs(lambda: check_chain_inputs(data, cfg.data))  # before Ray and MLflow: one clear line
        from pipelines.chain import run_chain

        with _console(workdir, verbose), _guarded(workdir):
            _check_inputs(lambda: run_chain(cfg, data, workdir, address=address, console=console, verbose=verbose))


def _check_inputs(call):
    """``call()``, with a dataset that cannot be read or split (or a refused shard folder) as one error line."""
    from mdlda.datasets import DatasetFormatError, DatasetSplitError
    from mdlda.manifest import ShardError
    from pipelines.prepare_folder import PrepareError

    try:
        return call()
    except (DatasetFormatError, DatasetSplitError, PrepareError, ShardError) as exc:
        _fail(str(exc))


@contextmanager
def _guarded(workdir: Path):
    """Clear messages for an unusable tracking store (a locked SQLite store shows the server command) and for a
    multi-node run whose storage is node-local."""
    from mdlda.tracking import TrackingError, sqlite_guard
    from pipelines.preflight import DurabilityError

    try:
        with sqlite_guard(workdir):
            yield
    except (TrackingError, DurabilityError) as exc:
        _fail(str(exc))


def with_budget(cfg, time_budget: float | None, max_trials: int | None, baseline: bool):
    """The config with the command line's sweep budget on the teacher sweep (or, ``baseline``, every baseline)."""
    from mdlda.config import ConfigError

    update = {k: v for k, v in (("time_budget_s", time_budget), ("max_trials", max_trials)) if v is not None}
    if not update:
        return cfg
    if any(v < 0 for v in update.values()):
        raise ConfigError(f"budgets must be >= 0, got {update}")
    if baseline:
        return cfg.model_copy(update={"baselines": [b.model_copy(update=update) for b in cfg.baselines]})
    return cfg.model_copy(update={"teachers": cfg.teachers.model_copy(update=update)})


def _chain(
    config: Path,
    workdir: Path,
    set_: list[str],
    address: str | None,
    budget: tuple = (None, None, False),
    verbose: bool = False,
):
    from mdlda.config import ConfigError, load_chain_config
    from pipelines.chain import Chain

    try:
        cfg = with_budget(load_chain_config(config, set_), *budget)
    except ConfigError as exc:
        _fail(str(exc))
    with _guarded(workdir):
        return Chain(cfg, workdir, address=address, console=console, verbose=verbose)


CONFIG_OPT = typer.Option(Path("tune_spaces/demo.yaml"), help="Chain config YAML (tune_spaces/).")
WORKDIR_OPT = typer.Option(Path("work"), help="The chain's working folder (shards, Ray results, MLflow store).")
SET_OPT = typer.Option([], "--set", help="Override a config key, e.g. --set teachers.num_samples=8 (repeatable).")
ADDRESS_OPT = typer.Option(None, help="Ray address ('auto' for a running cluster); local Ray if unset.")


@app.command()
def teachers(
    config: Path = CONFIG_OPT,
    workdir: Path = WORKDIR_OPT,
    set_: list[str] = SET_OPT,
    address: str | None = ADDRESS_OPT,
    baseline: bool = typer.Option(False, help="Run the baseline sweeps (no adversary: RF-ResNet, VGG-ish)."),
    select_only: bool = typer.Option(
        False,
        help="Do not train: re-read the finished sweep from its storage folder "
        "and print (and register) the same ordered top-k.",
    ),
    time_budget: float | None = typer.Option(
        None, help="Stop launching trials after SECONDS of wall time; running trials finish, selection follows."
    ),
    max_trials: int | None = typer.Option(None, help="Stop launching trials after N in total (resumes count)."),
    verbose: bool = VERBOSE_OPT,
    rerun: str | None = typer.Option(
        None,
        help="Train trial TRIAL_ID of the stored sweep again from its recorded config and compare its "
        "per-epoch validation scores with the logged ones (exit 1 beyond the tolerance).",
    ),
) -> None:
    """Ray Tune sweep of DANN teachers (or --baseline), then automatic top-k selection into the registry.

    Needs the shards of `mdlda prepare` (or of an earlier `mdlda run`) in WORKDIR/shards. Rerunning resumes an
    interrupted sweep without redoing finished trials.
    """
    with _locked(workdir), _console(workdir, verbose):
        chain = _chain(config, workdir, set_, address, (time_budget, max_trials, baseline), verbose)
        with _guarded(workdir):
            _teachers(chain, baseline, select_only, rerun)


def _teachers(chain, baseline: bool, select_only: bool, rerun: str | None) -> None:
    from mdlda.manifest import ShardError
    from pipelines.select import SelectionError

    try:
        if rerun:
            sweeps = chain.cfg.baselines if baseline else [chain.cfg.teachers]
            errors = []
            for sweep in sweeps:
                try:
                    res = chain.rerun(sweep, baseline, rerun)
                except KeyError as exc:
                    errors.append(str(exc).strip("'\""))
                    continue
                if not res.matches:
                    _fail(f"the rerun of {rerun} differs from its logged scores by {res.max_abs_diff:.2e}")
                return
            _fail("; ".join(errors))
        elif select_only:
            sweeps = chain.cfg.baselines if baseline else [chain.cfg.teachers]
            for sweep in sweeps:
                chain.select_only(sweep, baseline)
        elif baseline:
            chain.baselines()
        else:
            chain.teachers()
    except (ShardError, SelectionError, FileNotFoundError) as exc:
        _fail(str(exc))


@app.command()
def pseudolabel(
    config: Path = CONFIG_OPT,
    workdir: Path = WORKDIR_OPT,
    set_: list[str] = SET_OPT,
    address: str | None = ADDRESS_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Label a seeded subset of MAESTRO segments with the mean of the registered teachers (Ray Data actors)."""
    with _locked(workdir), _console(workdir, verbose):
        chain = _chain(config, workdir, set_, address, verbose=verbose)
        with _guarded(workdir):
            try:
                chain.pseudolabel()
            except RuntimeError as exc:
                _fail(str(exc))


@app.command()
def student(
    config: Path = CONFIG_OPT,
    workdir: Path = WORKDIR_OPT,
    set_: list[str] = SET_OPT,
    address: str | None = ADDRESS_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Distil the student with Ray Train on source + pseudo-labelled piano segments; register it."""
    with _locked(workdir), _console(workdir, verbose):
        chain = _chain(config, workdir, set_, address, verbose=verbose)
        with _guarded(workdir):
            chain.student()


@app.command()
def evaluate(
    models: list[str] = typer.Argument(
        None,
        help="NAME=URI pairs (e.g. student=models:/mdlda-student@champion); "
        "default: the registered baselines, teachers and student.",
    ),
    config: Path = CONFIG_OPT,
    workdir: Path = WORKDIR_OPT,
    set_: list[str] = SET_OPT,
    address: str | None = ADDRESS_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Per-feature Pearson r and RMSE on the non-piano test split and the piano test subset."""
    chosen = {}
    for item in models or []:
        name, sep, uri = item.partition("=")
        if not sep:
            name, uri = item, item
        chosen[name] = uri
    with _locked(workdir), _console(workdir, verbose):
        chain = _chain(config, workdir, set_, address, verbose=verbose)
        with _guarded(workdir):
            chain.evaluate(chosen or chain.registered_models())


@app.command()
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
        _fail(f"--batch-size must be at least 1 window per forward pass, got {batch_size}")
    if hop <= 0:
        _fail(f"--hop must be > 0 seconds between window starts, got {hop:g}")
    for path in audio:
        if not path.is_file():
            what = "is a directory, not an audio file" if path.is_dir() else "not found"
            _fail(f"{path}: {what}")
    use_tracking(workdir)
    try:
        served, ood = load_served_with_ood(model)
    except TrackingError as exc:
        _fail(f"{exc}. Registered models are listed by `mlflow ui` or MlflowClient().search_registered_models().")
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
            _fail(str(exc))
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


@app.command()
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
        _fail(str(exc))
    if as_json:
        print(json.dumps(tree.to_dict(), indent=1))
    else:
        console.print(render(tree))
    broken = tree.broken()
    if broken:
        _fail(f"{len(broken)} link(s) do not resolve: " + "; ".join(f"{b.role} {b.ref}: {b.detail}" for b in broken))


from pipelines.cli.conespressione import register as _register_conespressione  # noqa: E402

_register_conespressione(app)

from pipelines.cli.compare import register as _register_compare  # noqa: E402

_register_compare(app)

from pipelines.cli.ablation import register as _register_ablation  # noqa: E402

_register_ablation(app)

from pipelines.cli.ui import register as _register_ui  # noqa: E402

_register_ui(app)


def main() -> None:  # pragma: no cover - console entry point
    app()
