"""The `mdlda` command line: one subcommand per stage. It only parses options and dispatches to the stages.

Each group of commands is a module with a ``register(app)``; the order below is the order of `mdlda --help`.
"""

from __future__ import annotations

import typer

from pipelines.cli import ablation, compare, conespressione, prepare, serve, stages, ui
from pipelines.cli.common import console, fail, with_budget

app = typer.Typer(
    help="mdlda: mid-level perceptual features of music, adapted to solo piano (Ray + MLflow).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

for _group in (prepare, stages, serve, conespressione, compare, ablation, ui):
    _group.register(app)

__all__ = ["app", "console", "fail", "main", "with_budget"]


def main() -> None:  # pragma: no cover - console entry point
    app()
