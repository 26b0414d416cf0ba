"""`mdlda ablation`: baseline vs baseline + AdaBN vs DANN teachers vs their ensemble vs the DA+TS student, over
seeds, with intervals. :func:`register` adds the command to the Typer app; the work is in ``pipelines/ablation.py``.
"""

from __future__ import annotations

import typer

from pipelines.cli.options import DEMO_CONFIG, WORK, Address, Config, Data, RunWorkdir


def ablation(
    config: Config = DEMO_CONFIG,
    data: Data = ...,
    workdir: RunWorkdir = WORK,
    seeds: int = typer.Option(3, min=1, help="Number of seeds (1..N) when --seed is not given."),
    seed: list[int] = typer.Option([], "--seed", help="An explicit seed (repeatable); overrides --seeds."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set teachers.num_samples=8."),
    student_variant: list[str] = typer.Option(
        [],
        "--student-variant",
        help="An extra student per seed, paired to the seed's student: keys under student: (repeatable), "
        "e.g. --student-variant init=scratch.",
    ),
    address: Address = None,
) -> None:
    """Train every model of the ablation for each seed (the chain's own stages, resumable) and report mean ± 95%
    interval over seeds and paired differences to the baseline: WORKDIR/results/ablation/{ablation.md,csv,png}."""
    from mdlda.config import ConfigError
    from pipelines.cli.common import command_console, console, fail, guarded, load_config, locked

    with locked(workdir):  # first: a second writer on the workdir is refused before any other work
        cfg = load_config(config, set_)
        chosen = list(seed) or list(range(1, seeds + 1))
        if len(set(chosen)) != len(chosen):
            fail(f"--seed values must be distinct, got {chosen}")
        from mdlda.manifest import ShardError
        from pipelines.ablation import AblationPlan, parse_variant, run_ablation

        try:
            plan = AblationPlan(chosen, [parse_variant(v, cfg) for v in student_variant], address)
        except (ConfigError, ValueError) as exc:
            fail(str(exc))
        from pipelines.select import SelectionError

        with command_console(workdir, verbose=False), guarded(workdir):  # Ray, Tune and MLflow in WORKDIR/logs
            try:
                run_ablation(cfg, data, workdir, plan, console=console)
            except (ShardError, SelectionError) as exc:
                fail(str(exc))


def register(app: typer.Typer) -> None:
    """Add `ablation` to ``app``."""
    app.command("ablation")(ablation)
