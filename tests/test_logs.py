"""Size-capped logs: the rotating workdir log and Ray's rotation settings."""

from __future__ import annotations

import logging

from mdlda.logs import cap_ray_logs, setup_file_logging


def test_workdir_log_rotates_at_its_cap(tmp_path):
    path = setup_file_logging(tmp_path, max_bytes=2_000, backups=2)
    assert setup_file_logging(tmp_path, max_bytes=2_000, backups=2) == path  # no second handler
    log = logging.getLogger("pipelines.test_logs")
    try:
        for i in range(500):
            log.info("progress line %04d %s", i, "x" * 40)
        files = sorted(p.name for p in path.parent.iterdir())
        assert files == ["mdlda.log", "mdlda.log.1", "mdlda.log.2"]  # old files beyond the backups are gone
        assert all(p.stat().st_size <= 2_000 for p in path.parent.iterdir())
        assert "progress line 0499" in path.read_text()  # the newest record is kept
    finally:
        for name in ("mdlda", "pipelines"):
            logger = logging.getLogger(name)
            for h in [h for h in logger.handlers if getattr(h, "baseFilename", "").startswith(str(tmp_path))]:
                logger.removeHandler(h)
                h.close()


def test_ray_rotation_is_set_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv("RAY_ROTATION_MAX_BYTES", raising=False)
    monkeypatch.setenv("RAY_ROTATION_BACKUP_COUNT", "7")
    got = cap_ray_logs(max_bytes=1234, backups=2)
    assert got == {"RAY_ROTATION_MAX_BYTES": "1234", "RAY_ROTATION_BACKUP_COUNT": "7"}
