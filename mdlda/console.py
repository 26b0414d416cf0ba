"""What a person sees while a command works: mdlda's own lines on the console, everything else in log files.

:func:`command_console` sets a command up: the ``mdlda`` / ``pipelines`` loggers write ``<workdir>/logs/mdlda.log``
and, through :class:`ConsoleHandler`, the console; unless ``verbose``, what Ray, Tune and MLflow print goes to
``<workdir>/logs/libraries.log`` (:func:`mdlda.logs.libraries_to_file`), and the console says so once.

Stages report progress as log records: a record with a ``view`` (a dict, e.g. a sweep's trials) is an event. On
a terminal the handler keeps a live table of the latest view; elsewhere (CI, a log file, ``ray job submit``) it
prints the record's message, one line per event. Warnings are printed once each, in mdlda's words.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from mdlda.logs import LOGGERS, libraries_to_file, setup_file_logging


class ConsoleHandler(logging.Handler):
    """The console side of the mdlda loggers: events (records with a ``view``) as a live table on a terminal or one
    line each elsewhere; warnings and errors once each; other INFO records only when they ask (``show=True``)."""

    def __init__(self, console: Console, live: bool | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.console = console
        self.live = console.is_terminal if live is None else live
        self._live: Live | None = None
        self._seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            view = getattr(record, "view", None)
            if record.levelno >= logging.WARNING:
                msg = record.getMessage()
                if msg not in self._seen:
                    self._seen.add(msg)
                    label = "[bold red]error:[/]" if record.levelno >= logging.ERROR else "[yellow]warning:[/]"
                    self.console.print(f"{label} {escape(msg)}", soft_wrap=True, highlight=False)
            elif view is not None and self.live:
                self._show(view)
            elif record.levelno >= logging.INFO and (view is not None or getattr(record, "show", False)):
                self.console.print(escape(record.getMessage()), soft_wrap=True, highlight=False)
        except Exception:
            self.handleError(record)

    def _show(self, view: dict) -> None:
        table = render(view)
        if self._live is None:
            # redirect_*=False: what other libraries print stays in their log file, never above the table
            self._live = Live(
                table, console=self.console, refresh_per_second=2, redirect_stdout=False, redirect_stderr=False
            )
            self._live.start()
        else:
            self._live.update(table)
        if view.get("final"):
            self._stop()

    def _stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def close(self) -> None:
        self._stop()
        super().close()


def render(view: dict):
    """The renderable of an event's view (``kind`` names it)."""
    if view.get("kind") == "sweep":
        return sweep_table(view)
    return Text(str(view))


def sweep_table(view: dict) -> Table:
    """A sweep's trials: state, epoch, last and best validation score, samples/s, data-wait share; totals + ETA."""
    t = Table(title=f"sweep {view['name']}", title_justify="left", caption=view.get("totals"), caption_justify="left")
    for col in ("trial", "state", "epoch", "last r", "best r", "samples/s", "data wait"):
        t.add_column(col, justify="left" if col in ("trial", "state") else "right")
    styles = {"running": "cyan", "failed": "red", "lost": "red", "finished": "green", "stopped": "green"}
    for row in view["rows"]:
        t.add_row(
            row["trial"],
            Text(row["state"], style=styles.get(row["state"], "")),
            _num(row.get("epoch"), "{:d}"),
            _num(row.get("last"), "{:.3f}"),
            _num(row.get("best"), "{:.3f}"),
            _num(row.get("samples_per_s"), "{:.1f}"),
            _num(row.get("data_wait"), "{:.0%}"),
        )
    return t


def _num(value, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


class RateColumn(ProgressColumn):
    """Items per second (rich's own speed column counts bytes)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.completed and task.elapsed:  # one update only (a few big batches)
            speed = task.completed / task.elapsed
        if speed is None:
            return Text("-", style="progress.data.speed")
        rate = f"{speed:.1f}" if speed >= 1 else f"{speed:.2g}"  # a slow stage (minutes per item) is not "0.0"
        return Text(f"{rate} {self.unit}/s", style="progress.data.speed")


def progress_bar(label: str, unit: str, console: Console | None = None, enabled: bool = True) -> Progress:
    """A bar with count, rate and ETA for long work (prepare, pseudo-labelling). Never redirects stdout: what
    other libraries print while it runs stays in their log file."""
    return Progress(
        TextColumn(f"[bold]{escape(label)}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        RateColumn(unit),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
        redirect_stdout=False,
        redirect_stderr=False,
    )


@contextmanager
def command_console(console: Console, workdir: str | Path, verbose: bool = False):
    """Set a command's console up for the duration of the block (see the module docstring); yields the log folder.

    The mdlda loggers stop propagating to the root logger meanwhile: a root handler that another library or
    ``ray job submit`` installed would otherwise print every line a second time.
    """
    import rich

    logs = setup_file_logging(workdir).parent
    handler = ConsoleHandler(console)
    saved = []
    for name in LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.propagate, lg.level))
        lg.addHandler(handler)
        lg.propagate = False
        if handler.live:  # live tables also take the DEBUG refreshes between events (the file handler drops them)
            lg.setLevel(logging.DEBUG)
    with ExitStack() as stack:
        try:
            where = "mdlda.log" if verbose else "mdlda.log; Ray, Tune and MLflow in libraries.log; --verbose shows them"
            if not verbose:
                stack.enter_context(libraries_to_file(workdir, consoles=[console, rich.get_console()]))
            console.print(f"[dim]logs: {escape(str(logs))}/ ({where})", soft_wrap=True, highlight=False)
            yield logs
        except BaseException as exc:
            handler.close()  # a live table stops before the error is printed
            if not verbose and getattr(exc, "exit_code", getattr(exc, "code", 1)) not in (0, None):
                console.print(
                    f"[dim]Ray, Tune and MLflow messages of this run: {escape(str(logs / 'libraries.log'))}",
                    soft_wrap=True,
                )
            raise
        finally:
            handler.close()
            for lg, propagate, level in saved:
                lg.removeHandler(handler)
                lg.propagate = propagate
                lg.setLevel(level)
