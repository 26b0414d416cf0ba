"""One writer per workdir, with real processes: a holder in a subprocess, contenders refused at once, naming it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mdlda.lock import LOCK_FILE, LockHeld, workdir_lock

REPO = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys\n"
    "from mdlda.lock import workdir_lock\n"
    "with workdir_lock(sys.argv[1], command='mdlda run --workdir W'):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.read()\n"
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture()
def holder(tmp_path):
    """A process holding tmp_path/wd's lock until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "wd")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def _mdlda(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=120,
    )


def test_a_second_writer_is_refused_at_once_naming_the_holder(holder, tmp_path):
    wd = tmp_path / "wd"
    with pytest.raises(LockHeld, match=rf"pid {holder.pid} on .*`mdlda run --workdir W`, since 20\d\d-"):
        with workdir_lock(wd):
            pass
    start = time.monotonic()
    res = _mdlda("student", "--workdir", str(wd))
    said = " ".join((res.stdout + res.stderr).split())
    assert res.returncode == 1, said
    assert f"pid {holder.pid}" in said and "`mdlda run --workdir W`" in said and "in use by another mdlda" in said
    assert time.monotonic() - start < 60  # refused before Ray or MLflow start
    assert not (wd / "mlflow.db").exists() and not (wd / "logs").exists()

    holder.stdin.close()  # the holder finishes: the lock is free again, and now names us
    assert holder.wait(timeout=30) == 0
    with workdir_lock(wd, command="second") as path:
        assert '"command": "second"' in path.read_text()
    assert path.read_text() == ""  # released: no stale holder record


def test_a_killed_holder_leaves_no_stale_lock(holder, tmp_path):
    holder.kill()
    holder.wait(timeout=30)
    with workdir_lock(tmp_path / "wd"):
        pass


def test_prepare_locks_its_out_folder_but_writes_nothing_into_a_users_folder(holder, tmp_path):
    res = _mdlda("prepare", "midlevel", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "wd"))
    said = " ".join((res.stdout + res.stderr).split())
    assert res.returncode == 1 and f"pid {holder.pid}" in said, said

    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "song.wav").write_bytes(b"user audio")
    res = _mdlda("prepare", "midlevel", "--root", str(tmp_path / "nowhere"), "--out", str(mine))
    said = " ".join((res.stdout + res.stderr).split())
    assert res.returncode == 1 and "is not an mdlda shard folder" in said, said
    assert sorted(p.name for p in mine.rglob("*")) == ["data", "song.wav"] and not (mine / LOCK_FILE).exists()


def test_every_writing_command_takes_the_workdir_lock(holder, tmp_path):
    """In this process (the holder is another one): refused before any config, Ray or MLflow work."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    wd = str(tmp_path / "wd")
    for args in (
        ["run", "--data", str(tmp_path), "--workdir", wd],
        ["teachers", "--workdir", wd],
        ["teachers", "--select-only", "--workdir", wd],
        ["pseudolabel", "--workdir", wd],
        ["evaluate", "--workdir", wd],
        ["ablation", "--data", str(tmp_path), "--workdir", wd],
    ):
        res = CliRunner().invoke(app, args)
        said = " ".join(res.output.split())
        assert res.exit_code == 1 and f"pid {holder.pid}" in said, (args, said)
