"""Size-capped logs: the chain's own log file in the workdir, and Ray's log rotation for a Ray started here.

``<workdir>/logs/mdlda.log`` receives the records of the ``mdlda`` and ``pipelines`` loggers (stage progress,
sweep progress lines, warnings) and rotates at ``max_bytes`` keeping ``backups`` old files, so a week-long sweep
cannot fill the disk with its own chatter. Ray's files (raylet, GCS, workers' output) rotate by the
``RAY_ROTATION_MAX_BYTES`` / ``RAY_ROTATION_BACKUP_COUNT`` environment variables, which must be set before Ray
starts: :func:`cap_ray_logs` sets them (unless the user did) for the local Ray a command starts; a cluster takes
them from its node start commands.

``<workdir>/logs/libraries.log`` receives what other libraries print while a command runs without ``--verbose``
(:func:`libraries_to_file`): the console shows mdlda's own lines only.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

MAX_BYTES = 20 * 1024 * 1024
BACKUPS = 3
RAY_MAX_BYTES = 100 * 1024 * 1024
RAY_BACKUPS = 3
LOGGERS = ("mdlda", "pipelines")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_file_logging(workdir: str | Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> Path:
    """Attach (once per path) a rotating file handler for the mdlda loggers; returns the log file's path."""
    path = Path(workdir).resolve() / "logs" / "mdlda.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if any(getattr(h, "baseFilename", None) == str(path) for h in logger.handlers):
            continue
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.setLevel(logging.INFO)
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    return path


def cap_ray_logs(max_bytes: int = RAY_MAX_BYTES, backups: int = RAY_BACKUPS) -> dict[str, str]:
    """Ray's log rotation for a Ray started by this process (user settings win); returns what is in effect."""
    os.environ.setdefault("RAY_ROTATION_MAX_BYTES", str(max_bytes))
    os.environ.setdefault("RAY_ROTATION_BACKUP_COUNT", str(backups))
    return {k: os.environ[k] for k in ("RAY_ROTATION_MAX_BYTES", "RAY_ROTATION_BACKUP_COUNT")}


# ------------------------------------------------------------------------------------------ the libraries' output
LIBRARY_LOG = "libraries.log"
_LIBRARY_LOGGER = "mdlda_libraries"  # not under "mdlda": these lines never reach mdlda.log or the console


class _LineSink(io.TextIOBase):
    """A text stream whose lines become records of one logger: what other libraries print (Ray's raylet notices,
    Tune's banner, MLflow's "Successfully registered model", Python warnings) lands in the library log."""

    def __init__(self, logger: logging.Logger, fd: int) -> None:
        self._logger, self._fd, self._buf = logger, fd, ""
        self._lock = threading.Lock()
        self._busy = threading.local()  # a logging error printed to sys.stderr (this sink) must not recurse

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # code writing to the descriptor (faulthandler, subprocesses) reaches the log too
        return self._fd

    def write(self, text: str) -> int:
        if getattr(self._busy, "on", False):
            return len(text)
        with self._lock:
            self._buf += text
            *lines, self._buf = self._buf.split("\n")
        self._busy.on = True
        try:
            for line in lines:
                if line.strip():
                    self._logger.info(line.rstrip())
        finally:
            self._busy.on = False
        return len(text)


def _pump(fd: int, logger: logging.Logger) -> None:
    """Log every line written to the pipe ``fd`` (Ray's C++ core worker and child processes write to fd 2).
    Runs for the process's lifetime: a child process that inherited the pipe must never block on a full one."""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        for raw in iter(pipe.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            if line:
                logger.info(line)


def library_logger(workdir: str | Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> logging.Logger:
    """The logger of ``<workdir>/logs/libraries.log`` (rotating like mdlda.log, one file at a time)."""
    path = Path(workdir).resolve() / "logs" / LIBRARY_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(_LIBRARY_LOGGER)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if not any(getattr(h, "baseFilename", None) == str(path) for h in logger.handlers):
        for old in list(logger.handlers):  # another workdir's file (an earlier command in this process)
            logger.removeHandler(old)
            old.close()
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    return logger


def _stream_handlers():
    loggers = [logging.getLogger()] + [
        lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                yield h


@contextmanager
def libraries_to_file(workdir: str | Path, consoles=()):
    """Everything other libraries print goes to ``<workdir>/logs/libraries.log`` while the block runs: Python's
    ``sys.stdout`` / ``sys.stderr``, the stream handlers of their loggers (Ray, Ray Data, Tune, MLflow), Python
    warnings and, through a pipe on file descriptor 2, what C++ code and child processes write (Ray's core worker).

    ``consoles`` (rich Consoles) keep writing to the real terminal (those made with a ``file``, to that file).
    An exception leaving the block is printed after the streams are restored, so errors stay on the console.
    Yields the library log's path.
    """
    logger = library_logger(workdir)
    path = Path(logger.handlers[0].baseFilename)
    real_out, real_err = sys.stdout, sys.stderr
    real_out.flush()
    real_err.flush()
    saved_fd2 = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    threading.Thread(target=_pump, args=(read_end, logger), name="mdlda-stderr-pipe", daemon=True).start()
    term_err = real_err
    if real_err is sys.__stderr__:  # its descriptor is the pipe now: the console's error lines need the real one
        term_err = os.fdopen(os.dup(saved_fd2), "w", buffering=1, encoding=getattr(real_err, "encoding", None))
    sinks = (_LineSink(logger, 2), _LineSink(logger, 2))
    patched = []
    for h in _stream_handlers():
        if h.stream in (real_out, real_err, sys.__stdout__, sys.__stderr__):
            patched.append((h, h.stream))
            h.setStream(sinks[1])
    bound = [c for c in consoles if c._file is None]  # a Console without a file follows sys.stdout / sys.stderr
    for c in bound:
        c.file = term_err if c.stderr else real_out
    sys.stdout, sys.stderr = sinks
    try:
        yield path
    finally:
        sys.stdout, sys.stderr = real_out, real_err
        for c in bound:
            c.file = None
        for h, stream in patched:
            h.setStream(stream)
        for h in _stream_handlers():  # handlers configured inside the block (Ray Data's, lazily) bound a sink
            if h.stream in sinks:
                h.setStream(real_err)
        os.dup2(saved_fd2, 2)  # the pipe's reader keeps running for children that still hold the pipe
        os.close(saved_fd2)
        if term_err is not real_err:
            term_err.close()
