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


def test_what_other_libraries_print_goes_to_the_library_log_and_mdldas_console_stays(tmp_path, capfd):
    import os
    import sys
    import time

    from rich.console import Console

    from mdlda.logs import libraries_to_file

    chatty = logging.getLogger("some_library")
    handler = logging.StreamHandler(sys.stderr)  # bound when the library was imported, like Ray's and MLflow's
    chatty.addHandler(handler)
    console = Console(width=100)
    try:
        with libraries_to_file(tmp_path, consoles=[console]) as path:
            print("a library's print")
            sys.stderr.write("a library's stderr line\n")
            chatty.warning("a library's log record")
            os.write(2, b"a C++ line on fd 2\n")
            console.print("mdlda's own line")
            for _ in range(50):  # the pipe's reader is a thread
                if "C++ line" in path.read_text():
                    break
                time.sleep(0.1)
        print("after the block")
    finally:
        chatty.removeHandler(handler)
    out, err = capfd.readouterr()
    assert out == "mdlda's own line\nafter the block\n" and err == "", (out, err)
    log = path.read_text()
    for line in ("a library's print", "a library's stderr line", "a library's log record", "a C++ line on fd 2"):
        assert line in log, log
    assert handler.stream is sys.stderr  # the library's handler writes where it did before
    assert path == tmp_path.resolve() / "logs" / "libraries.log"
