"""One writer per workdir: an exclusive lock held for the life of a command that writes there.

Two chains on one workdir corrupt each other's staging folders and Tune state and can move the champion the wrong
way, so every writing command (``run``, ``teachers``, ``pseudolabel``, ``student``, ``evaluate``, ``ablation``, and
``prepare`` on its ``--out``) takes :func:`workdir_lock` first. The lock is ``fcntl.flock`` on ``<folder>/.mdlda.lock``:
the kernel drops it when the holder exits, however it exits (also ``kill -9``), so a stale file never blocks anyone.
The file holds the holder's pid, host, command line and start time, so a refused command can name it. The file
itself stays (removing a lock file while another process waits on it would let two holders in).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".mdlda.lock"


class LockHeld(RuntimeError):
    """Another process holds the folder's lock; the message names it (pid, host, command, since when)."""


def command_line() -> str:
    """This process's command line as typed (``mdlda run --workdir w ...``)."""
    argv = list(sys.argv) or ["?"]
    argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def _describe(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder.get('host', '?')}, `{holder['command']}`, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its record yet
        return "a process that is just starting"


@contextmanager
def workdir_lock(folder: str | Path, command: str | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the ``with`` block; raise :class:`LockHeld`
    at once, without waiting, when another process holds it."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(
                f"{folder} is in use by another mdlda command ({_describe(path)}): one command writes to a workdir "
                f"at a time. Wait for it to finish, or use another folder (the lock is {path})."
            ) from None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command or command_line(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # no stale holder record once released
    finally:
        os.close(fd)  # releases the flock
