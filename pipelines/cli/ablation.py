"""`mdlda ablation`: baseline vs baseline + AdaBN vs DANN teachers vs their ensemble vs the DA+TS student, over
seeds, with intervals. :func:`register` adds the command to the Typer app; the work is in ``pipelines/ablation.py``.
"""

from __future__ import annotations

from pathlib import Path

import typer


def ablation(
    config: Path = typer.Option(Path("tune_spaces/demo.yaml"), help="Chain config YAML (tune_spaces/)."),
    data: Path = typer.Option(..., help="Data root holding the Mid-level and MAESTRO folders named in the config."),
    workdir: Path = typer.Option(Path("work"), help="Where shards, Ray results, the MLflow store and results go."),
    seeds: int = typer.Option(3, min=1, help="Number of seeds (1..N) when --seed is not given."),
    seed: list[int] = typer.Option([], "--seed", help="An explicit seed (repeatable); overrides --seeds."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set teachers.num_samples=8."),
    student_variant: list[str] = typer.Option(
        [],
        "--student-variant",
        help="An extra student per seed, paired to the seed's student: keys under student: (repeatable), "
        "e.g. --student-variant init=scratch.",
    ),
    address: str | None = typer.Option(None, help="Ray address ('auto' for a running cluster); local Ray if unset."),
) -> None:
    """Train every model of the ablation for each seed (the chain's own stages, resumable) and report mean ± 95%
    interval over seeds and paired differences to the baseline: WORKDIR/results/ablation/{ablation.md,csv,png}."""
    from mdlda.config import ConfigError, load_chain_config
    from pipelines.cli import _console, _fail, _guarded, _locked, console

    with _locked(workdir):  # first: a second writer on the workdir is refused before any other work
        try:
            cfg = load_chain_config(config, set_)
        except ConfigError as exc:
            _fail(str(exc))
        chosen = list(seed) or list(range(1, seeds + 1))
        if len(set(chosen)) != len(chosen):
            _fail(f"--seed values must be distinct, got {chosen}")
        from mdlda.manifest import ShardError
        from pipelines.ablation import AblationPlan, parse_variant, run_ablation

        try:
            plan = AblationPlan(chosen, [parse_variant(v, cfg) for v in student_variant], address)
        except (ConfigError, ValueError) as exc:
            _fail(str(exc))
        from pipelines.select import SelectionError

        with _console(workdir, verbose=False), _guarded(workdir):  # Ray, Tune and MLflow in WORKDIR/logs
            try:
                run_ablation(cfg, data, workdir, plan, console=console)
            except (ShardError, SelectionError) as exc:
                _fail(str(exc))


def register(app: typer.Typer) -> None:
    """Add `ablation` to ``app``."""
    app.command("ablation")(ablation)
