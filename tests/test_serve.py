"""Registered models as MLflow users use them: the real ``mlflow models serve`` answering real HTTP, the signature,
``mlflow.pyfunc``; and ``mdlda ui`` starting the real MLflow UI on a workdir's store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

# A busy 2-CPU box took 195 s to start `mlflow models serve` and 39 s to answer one 2-clip request.
START_TIMEOUT_S = 900.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    root = str(Path(__file__).resolve().parents[1])
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),  # serve starts `uvicorn`
        PYTHONPATH=os.pathsep.join([root, env.get("PYTHONPATH", "")]),
        **extra,
    )
    return env


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """Kill the server's whole process group (uvicorn's workers too), politely first."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_http(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} before answering:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    pytest.fail(f"{url} did not answer within {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")


def _post_json(url: str, payload: dict, timeout: float = 600.0) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


@pytest.fixture()
def store(monkeypatch, tmp_path, seed_store):
    """A fresh embedded store in tmp_path/wd (the workdir, returned), the active one for the test."""
    import mlflow

    from mdlda.tracking import setup_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    setup_tracking(seed_store(tmp_path / "wd").parent, "serve")
    yield tmp_path / "wd"
    mlflow.end_run()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_registered_models_features(store, tmp_path):
    """Logs a tiny model as mdlda-student@champion, serves it with the real `mlflow models serve`, POSTs two clips
    and compares with mdlda's own weights-only prediction; the signature names the 7 outputs; pyfunc works."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from mdlda.models import create_model
    from mdlda.params import FEATURES, SAMPLE_RATE, SEGMENT_SAMPLES
    from mdlda.tracking import STUDENT_MODEL, load_served, log_model, tracking_uri

    torch.manual_seed(0)
    with mlflow.start_run():
        log_model(create_model("rfresnet", width=2).eval(), registered_model_name=STUDENT_MODEL)
    MlflowClient().set_registered_model_alias(STUDENT_MODEL, "champion", "1")
    uri = f"models:/{STUDENT_MODEL}@champion"

    port = _free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
    proc = _start(cmd + ["-h", "127.0.0.1", "-p", str(port)], _env(MLFLOW_TRACKING_URI=tracking_uri(store)), log)
    try:
        # while the server starts: the signature and the pyfunc path
        info = mlflow.models.get_model_info(uri)
        assert info.signature.inputs.is_tensor_spec()
        assert info.signature.inputs.inputs[0].shape == (-1, SEGMENT_SAMPLES)
        assert info.signature.outputs.input_names() == list(FEATURES)
        assert info.metadata["features"] == list(FEATURES)

        t = np.arange(SEGMENT_SAMPLES) / SAMPLE_RATE
        audio = np.stack(
            [
                np.random.default_rng(0).uniform(-0.3, 0.3, SEGMENT_SAMPLES),  # noise
                0.4 * np.sin(2 * np.pi * 220.0 * t) * (1 + np.sin(2 * np.pi * 2.0 * t)) / 2,  # a pulsing tone
            ]
        ).astype(np.float32)
        with torch.no_grad():
            expect = load_served(uri)(torch.from_numpy(audio)).numpy()
        assert expect.shape == (2, len(FEATURES)) and np.abs(expect[0] - expect[1]).max() > 1e-3
        pyfunc = mlflow.pyfunc.load_model(uri).predict(audio)
        np.testing.assert_allclose(np.asarray(pyfunc), expect, rtol=1e-4, atol=1e-4)

        _wait_http(proc, f"http://127.0.0.1:{port}/ping", log)
        body = _post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": audio.tolist()})
        with pytest.raises(urllib.error.HTTPError) as short:  # a clip of another length: refused by the signature
            _post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": audio[:, :1000].tolist()})
        refusal = short.value.read().decode()
    finally:
        _stop(proc)
    assert short.value.code == 400 and "does not match expected shape" in refusal, refusal[:500]
    assert list(body) == ["predictions"], body.keys()
    served = np.asarray(body["predictions"], dtype=np.float64)
    assert served.shape == (2, len(FEATURES))
    np.testing.assert_allclose(served, expect, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_mdlda_ui_serves_the_workdirs_store_on_localhost(store, tmp_path):
    """`mdlda ui --workdir W --port P` starts the MLflow UI: its page answers, and its REST API lists W's experiment
    (so it is W's store, not a default one) with W's artifact root; stopped by a process-group kill."""
    import mlflow

    with mlflow.start_run(run_name="visible-in-the-ui"):
        mlflow.log_metric("val_r_mean", 0.5)
    port = _free_port()
    log = tmp_path / "ui.log"
    cmd = [sys.executable, "-m", "pipelines.cli", "ui", "--workdir", str(store), "--port", str(port)]
    proc = _start(cmd, _env(), log)
    try:
        _wait_http(proc, f"http://127.0.0.1:{port}/", log)
        found = _post_json(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search", {"max_results": 10})
        runs = _post_json(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
            {"experiment_ids": [e["experiment_id"] for e in found["experiments"]]},
        )
    finally:
        _stop(proc)
    by_name = {e["name"]: e for e in found["experiments"]}
    assert "serve" in by_name
    assert by_name["serve"]["artifact_location"] == (store / "mlartifacts").resolve().as_uri()
    assert [r["info"]["run_name"] for r in runs["runs"]] == ["visible-in-the-ui"]
    assert f"http://127.0.0.1:{port}" in log.read_text()


def test_mdlda_ui_refuses_a_workdir_without_a_store_and_a_busy_port(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipelines.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner = CliRunner()
    res = runner.invoke(app, ["ui", "--workdir", str(tmp_path / "empty")])
    assert res.exit_code == 1 and "holds no MLflow store" in " ".join(res.output.split())
    assert not (tmp_path / "empty").exists()  # nothing created

    (tmp_path / "mlflow.db").write_bytes(b"")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        res = runner.invoke(app, ["ui", "--workdir", str(tmp_path), "--port", str(busy.getsockname()[1])])
    assert res.exit_code == 1 and "is in use" in " ".join(res.output.split())

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.7:5000")
    res = runner.invoke(app, ["ui", "--workdir", str(tmp_path / "empty")])
    assert res.exit_code == 0 and "http://10.0.0.7:5000" in res.output
