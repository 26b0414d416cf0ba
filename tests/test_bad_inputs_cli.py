"""The bad-input catalogue, continued (see test_bad_inputs.py): the command line refuses bad input in one error
line, before Ray or MLflow start, and loses nothing of the input. In-process (typer's CliRunner); no Ray."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from test_bad_inputs import ANN, META, _rename

from mdlda.datasets.maestro import CSV_NAME


# ------------------------------------------------------------- the command line: one line, before any compute
def _data(demo_root: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    for name in ("midlevel", "maestro"):
        shutil.copytree(demo_root / name, data / name)
    return data


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _config(tmp_path: Path, text: str = "{}\n") -> Path:
    (tmp_path / "chain.yaml").write_text(text)
    return tmp_path / "chain.yaml"


def _run(tmp, data, config=None, extra=()):
    return ["run", "--config", str(config or _config(tmp)), "--data", str(data), "--workdir", str(tmp / "wd"), *extra]


def _wavs(data: Path) -> list[str]:
    return sorted(str(p) for p in (data / "maestro").rglob("*.wav"))


CLI_CASES = [
    # (id, args(tmp, data) -> argv, what the one error line must say)
    ("run-data-root-missing", lambda t, d: _run(t, t / "nowhere"), r"nowhere: data root not found"),
    (
        "run-annotations-missing",
        lambda t, d: (d / "midlevel" / ANN).unlink() or _run(t, d),
        r"annotations\.csv: annotations not found",
    ),
    (
        "run-maestro-column-misspelt",
        lambda t, d: _rename(d / "maestro" / CSV_NAME, "duration", "durration") or _run(t, d),
        r"maestro-v3\.0\.0\.csv: MAESTRO metadata has no column 'duration'; did you mean 'durration'",
    ),
    (
        "run-piano-list-matches-nothing",
        lambda t, d: _write(d / "midlevel" / "piano_ids.csv", "song id\n777777\n") or _run(t, d),
        r"piano_ids\.csv: none of its 1 piano ids",
    ),
    (
        "run-piano-list-missing",
        lambda t, d: (d / "midlevel" / "piano_ids.csv").unlink() or _run(t, d),
        r"piano_ids\.csv: piano id list not found",
    ),
    (
        "config-yaml-typo-key",
        lambda t, d: _run(t, d, _config(t, "teachers:\n  num_sample: 2\n")),
        r"chain\.yaml: 1 problem\(s\): teachers\.num_sample: Extra inputs are not permitted \(got 2\)",
    ),
    (
        "config-set-typo",
        lambda t, d: _run(t, d, extra=["--set", "teacher.num_samples=2"]),
        r"teacher: Extra inputs are not permitted",
    ),
    (
        "config-wrong-type",
        lambda t, d: _run(t, d, extra=["--set", "teachers.num_samples=many"]),
        r"teachers\.num_samples: Input should be a valid integer.*\(got 'many'\)",
    ),
    (
        "config-invalid-yaml",
        lambda t, d: _run(t, d, _config(t, "teachers: [\n")),
        r"chain\.yaml: not valid YAML at line 2",
    ),
    ("config-file-missing", lambda t, d: _run(t, d, t / "nope.yaml"), r"nope\.yaml: config file not found"),
    (
        "prepare-root-missing",
        lambda t, d: ["prepare", "midlevel", "--root", str(t / "nowhere"), "--out", str(t / "out")],
        r"nowhere: Mid-level dataset folder not found",
    ),
    (
        "prepare-metadata-missing",
        lambda t, d: (
            (d / "midlevel" / META).unlink()
            or ["prepare", "midlevel", "--root", str(d / "midlevel"), "--out", str(t / "out")]
        ),
        r"metadata\.csv: metadata not found",
    ),
    (
        "prepare-out-holds-user-files",
        lambda t, d: ["prepare", "maestro", "--root", str(d / "maestro"), "--out", str(d)],
        r"not an mdlda shard folder|holds files",
    ),
    (
        "predict-batch-size-0",
        lambda t, d: ["predict", str(next((d / "maestro").rglob("*.wav"))), "--batch-size", "0"],
        r"--batch-size must be at least 1",
    ),
    (
        "predict-hop-0",
        lambda t, d: ["predict", str(next((d / "maestro").rglob("*.wav"))), "--hop", "0"],
        r"--hop must be > 0",
    ),
    (
        "predict-directory-named-x.mp3",
        lambda t, d: (t / "x.mp3").mkdir() or ["predict", str(t / "x.mp3")],
        r"x\.mp3: is a directory",
    ),
    ("predict-missing-file", lambda t, d: ["predict", str(t / "gone.wav")], r"gone\.wav: not found"),
    (
        "compare-one-file",
        lambda t, d: ["compare", _wavs(d)[0]],
        r"compare needs at least two performances of the same piece \(the reference first\), got 1",
    ),
    (
        "compare-unreadable-audio",
        lambda t, d: (
            _write(t / "take2.wav", "not audio at all" * 100) or ["compare", _wavs(d)[0], str(t / "take2.wav")]
        ),
        r"take2\.wav: cannot decode",
    ),
    ("compare-missing-file", lambda t, d: ["compare", _wavs(d)[0], str(t / "gone.wav")], r"gone\.wav: not found"),
    (
        "compare-workdir-without-store",
        lambda t, d: ["compare", *_wavs(d)[:2], "--workdir", str(t / "empty")],
        r"empty/mlflow\.db does not exist: .* holds no MLflow store",
    ),
]


@pytest.mark.parametrize("case, argv, match", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_the_command_line_refuses_bad_input_in_one_line_before_ray_or_mlflow(
    demo_root, tmp_path, monkeypatch, case, argv, match
):
    import ray
    from typer.testing import CliRunner

    from pipelines.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    # the session's own Ray may already be up (an earlier test started it): record whether this command calls
    # ray.init at all (the real one still runs if it does)
    started, real_init = [], ray.init
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append(a or k) or real_init(*a, **k))
    data = _data(demo_root, tmp_path)
    before = {p for p in data.rglob("*")}
    res = CliRunner().invoke(app, argv(tmp_path, data))
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.output, res.exception)
    assert len(lines) == 1 and lines[0].startswith("error:") and re.search(match, lines[0]), res.output
    assert not started  # refused before Ray started
    assert not list(tmp_path.rglob("mlflow.db")) and not (tmp_path / "mlruns").exists()  # and before MLflow
    assert {p for p in data.rglob("*")} >= before - {p for p in before if not p.exists()}  # nothing of the input lost
