"""What every command module shares: the console, the one-line error exit, the workdir lock, the libraries' output
kept out of the console, and the errors turned into one ``error:`` line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from pipelines.cli.options import ChainOptions

console = Console()


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)  # one line, never wrapped
    raise typer.Exit(code=1)


@contextmanager
def command_console(workdir: Path, verbose: bool):
    """The command's console: mdlda's lines (live tables on a terminal), the other libraries' output in
    ``workdir``/logs (:mod:`mdlda.console`)."""
    from mdlda.console import command_console as console_of

    with console_of(console, workdir, verbose):
        yield


@contextmanager
def locked(folder: Path):
    """Hold ``folder``'s one-writer lock for the command (:mod:`mdlda.lock`): a second command writing there exits
    at once with code 1, naming the holder."""
    from mdlda.lock import LockHeld, workdir_lock

    try:
        with workdir_lock(folder):
            yield
    except LockHeld as exc:
        fail(str(exc))


def check_inputs(call):
    """``call()``, with a dataset that cannot be read or split (or a refused shard folder) as one error line."""
    from mdlda.datasets import DatasetFormatError, DatasetSplitError
    from mdlda.manifest import ShardError
    from pipelines.prepare_folder import PrepareError

    try:
        return call()
    except (DatasetFormatError, DatasetSplitError, PrepareError, ShardError) as exc:
        fail(str(exc))


@contextmanager
def guarded(workdir: Path):
    """Clear messages for an unusable tracking store (a locked SQLite store shows the server command) and for a
    multi-node run whose storage is node-local."""
    from mdlda.tracking import TrackingError, sqlite_guard
    from pipelines.preflight import DurabilityError

    try:
        with sqlite_guard(workdir):
            yield
    except (TrackingError, DurabilityError) as exc:
        fail(str(exc))


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


def load_config(config: Path, set_: list[str], budget: tuple = (None, None, False)):
    """The chain config with its ``--set`` overrides and sweep budget; a bad config is one error line."""
    from mdlda.config import ConfigError, load_chain_config

    try:
        return with_budget(load_chain_config(config, set_), *budget)
    except ConfigError as exc:
        fail(str(exc))


@contextmanager
def open_chain(opts: ChainOptions, verbose: bool, budget: tuple = (None, None, False)) -> Iterator:
    """The :class:`pipelines.chain.Chain` of a stage command, with the workdir locked, the libraries' output in its
    logs and the tracking-store errors as one line."""
    from pipelines.chain import Chain

    with locked(opts.workdir), command_console(opts.workdir, verbose):
        cfg = load_config(opts.config, opts.set_, budget)
        with guarded(opts.workdir):
            chain = Chain(cfg, opts.workdir, address=opts.address, console=console, verbose=verbose)
        with guarded(opts.workdir):
            yield chain
