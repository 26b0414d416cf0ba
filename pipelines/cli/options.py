"""The options several commands share, declared once as ``Annotated`` types (Typer reads the option from the type).

The stage commands that work on an existing chain (teachers, pseudolabel, student, evaluate) take the same four:
:func:`chain_options` adds them to a command as one :class:`ChainOptions` argument.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

DEMO_CONFIG = Path("tune_spaces/demo.yaml")
WORK = Path("work")
NO_SETS: list[str] = []

Config = Annotated[Path, typer.Option(help="Chain config YAML (tune_spaces/).")]
Data = Annotated[Path, typer.Option(help="Data root holding the Mid-level and MAESTRO folders named in the config.")]
RunWorkdir = Annotated[Path, typer.Option(help="Where shards, Ray results, the MLflow store and results go.")]
Workdir = Annotated[Path, typer.Option(help="The chain's working folder (shards, Ray results, MLflow store).")]
Sets = Annotated[
    list[str], typer.Option("--set", help="Override a config key, e.g. --set teachers.num_samples=8 (repeatable).")
]
Address = Annotated[str | None, typer.Option(help="Ray address ('auto' for a running cluster); local Ray if unset.")]
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose", help="Show what Ray, Tune and MLflow print here (otherwise in WORKDIR/logs/libraries.log)."
    ),
]


@dataclass(frozen=True)
class ChainOptions:
    """Where a stage command finds its chain: the config (with ``--set`` overrides), the workdir, the Ray address."""

    config: Path = DEMO_CONFIG
    workdir: Path = WORK
    set_: list[str] = field(default_factory=list)
    address: str | None = None


_OPTION_TYPES = {"config": Config, "workdir": Workdir, "set_": Sets, "address": Address}


def chain_options(command):
    """Replace the ``opts: ChainOptions`` parameter of ``command`` by the four options of :class:`ChainOptions`
    (``--config``, ``--workdir``, ``--set``, ``--address``) at its place, and pack them back into one
    :class:`ChainOptions` when the command runs."""
    own = inspect.signature(command, eval_str=True)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    shared = [
        inspect.Parameter(name, kind, default=default, annotation=_OPTION_TYPES[name])
        for name, default in (("config", DEMO_CONFIG), ("workdir", WORK), ("set_", NO_SETS), ("address", None))
    ]
    params = []
    for p in own.parameters.values():
        params.extend(shared if p.name == "opts" else [p])

    @functools.wraps(command)
    def wrapper(**kwargs):
        opts = ChainOptions(**{name: kwargs.pop(name) for name in _OPTION_TYPES})
        return command(opts=opts, **kwargs)

    wrapper.__signature__ = own.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params} | {"return": own.return_annotation}
    del wrapper.__wrapped__  # Typer is to read the signature above, not the command's own
    return wrapper
