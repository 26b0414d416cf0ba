"""Size-capped logs: the chain's own log file in the workdir, and Ray's log rotation for a Ray started here.

``<workdir>/logs/mdlda.log`` receives the records of the ``mdlda`` and ``pipelines`` loggers (stage progress,
sweep progress lines, warnings) and rotates at ``max_bytes`` keeping ``backups`` old files, so a week-long sweep
cannot fill the disk with its own chatter. Ray's files (raylet, GCS, workers' output) rotate by the
``RAY_ROTATION_MAX_BYTES`` / ``RAY_ROTATION_BACKUP_COUNT`` environment variables, which must be set before Ray
starts: :func:`cap_ray_logs` sets them (unless the user did) for the local Ray a command starts; a cluster takes
them from its node start commands.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
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
