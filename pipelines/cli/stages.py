"""`mdlda run` (the whole chain) and the chain's stage commands: `teachers`, `pseudolabel`, `student`, `evaluate`.
:func:`register` adds them to a Typer app; the work is in :mod:`pipelines.chain`."""

from __future__ import annotations

import typer

from pipelines.cli.common import check_inputs, command_console, console, fail, guarded, load_config, locked, open_chain
from pipelines.cli.options import (
    DEMO_CONFIG,
    NO_SETS,
    WORK,
    Address,
    ChainOptions,
    Config,
    Data,
    RunWorkdir,
    Sets,
    Verbose,
    chain_options,
)


def run(
    config: Config = DEMO_CONFIG,
    data: Data = ...,
    workdir: RunWorkdir = WORK,
    set_: Sets = NO_SETS,
    address: Address = None,
    time_budget: float | None = typer.Option(None, help="Teacher sweep: stop launching trials after SECONDS."),
    max_trials: int | None = typer.Option(None, help="Teacher sweep: stop launching trials after N in total."),
    verbose: Verbose = False,
) -> None:
    """Run the whole chain: prepare, baselines, teachers, selection, pseudo-labels, student, evaluation.

    Resumable stage by stage: rerunning the same command skips every stage whose outputs exist and match.
    """
    from mdlda.datasets.inputs import check_chain_inputs

    with locked(workdir):  # first: a second writer on the workdir is refused before any other work
        cfg = load_config(config, set_, (time_budget, max_trials, False))
        check_inputs(lambda: check_chain_inputs(data, cfg.data))  # before Ray and MLflow: one clear line
        from pipelines.chain import run_chain

        with command_console(workdir, verbose), guarded(workdir):
            check_inputs(lambda: run_chain(cfg, data, workdir, address=address, console=console, verbose=verbose))


@chain_options
def teachers(
    opts: ChainOptions,
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
    verbose: Verbose = False,
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
    with open_chain(opts, verbose, (time_budget, max_trials, baseline)) as chain:
        _teachers(chain, baseline, select_only, rerun)


def _teachers(chain, baseline: bool, select_only: bool, rerun: str | None) -> None:
    from mdlda.manifest import ShardError
    from pipelines.select import SelectionError

    sweeps = chain.cfg.baselines if baseline else [chain.cfg.teachers]
    try:
        if rerun:
            _rerun(chain, sweeps, baseline, rerun)
        elif select_only:
            for sweep in sweeps:
                chain.select_only(sweep, baseline)
        elif baseline:
            chain.baselines()
        else:
            chain.teachers()
    except (ShardError, SelectionError, FileNotFoundError) as exc:
        fail(str(exc))


def _rerun(chain, sweeps: list, baseline: bool, trial_id: str) -> None:
    """Train ``trial_id`` again in the first of ``sweeps`` that holds it; exit 1 when its scores differ."""
    errors = []
    for sweep in sweeps:
        try:
            res = chain.rerun(sweep, baseline, trial_id)
        except KeyError as exc:
            errors.append(str(exc).strip("'\""))
            continue
        if not res.matches:
            fail(f"the rerun of {trial_id} differs from its logged scores by {res.max_abs_diff:.2e}")
        return
    fail("; ".join(errors))


@chain_options
def pseudolabel(opts: ChainOptions, verbose: Verbose = False) -> None:
    """Label a seeded subset of MAESTRO segments with the mean of the registered teachers (Ray Data actors)."""
    with open_chain(opts, verbose) as chain:
        try:
            chain.pseudolabel()
        except RuntimeError as exc:
            fail(str(exc))


@chain_options
def student(opts: ChainOptions, verbose: Verbose = False) -> None:
    """Distil the student with Ray Train on source + pseudo-labelled piano segments; register it."""
    with open_chain(opts, verbose) as chain:
        chain.student()


@chain_options
def evaluate(
    models: list[str] = typer.Argument(
        None,
        help="NAME=URI pairs (e.g. student=models:/mdlda-student@champion); "
        "default: the registered baselines, teachers and student.",
    ),
    opts: ChainOptions = None,
    verbose: Verbose = False,
) -> None:
    """Per-feature Pearson r and RMSE on the non-piano test split and the piano test subset."""
    chosen = {}
    for item in models or []:
        name, sep, uri = item.partition("=")
        if not sep:
            name, uri = item, item
        chosen[name] = uri
    with open_chain(opts, verbose) as chain:
        chain.evaluate(chosen or chain.registered_models())


def register(app: typer.Typer) -> None:
    """Add `run`, `teachers`, `pseudolabel`, `student` and `evaluate` to ``app``."""
    for command in (run, teachers, pseudolabel, student, evaluate):
        app.command()(command)
