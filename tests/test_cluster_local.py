"""A real multi-process Ray cluster on this machine: a head started with `ray start --head` on 127.0.0.1 plus one
worker node process; the smallest chain (tune_spaces/ci.yaml) is submitted with `cluster/submit.sh` (`ray job
submit`), must finish, and must have recorded to MLflow. Afterwards, with the cluster gone, the registered models
and the teachers' top-k checkpoints load from the durable storage (the Ray storage folder copied elsewhere).

The cluster is stopped by killing the process trees it started (never `ray stop`, which would stop every Ray on
the machine, including the test session's own).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(
        PATH=f"{BIN}:{env.get('PATH', '')}",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def _ray_start(args: list[str], env: dict) -> None:
    out = subprocess.run([str(BIN / "ray"), "start", *args], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr


def _cluster_processes(marker: str):
    """The daemons of the cluster whose temp dir is ``marker``, and every process under them."""
    import psutil

    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                roots.append(p)
        except psutil.Error:
            continue
    procs = {p.pid: p for p in roots}
    for p in roots:
        try:
            procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    return list(procs.values())


@contextmanager
def local_cluster():
    """Head (1 CPU) + worker node (2 CPUs) on 127.0.0.1; yields the dashboard address and the environment."""
    import psutil

    # Short paths (Ray's sockets live under them), one per node: two nodes on one machine sharing a temp dir would
    # share runtime_resources/, and one node's runtime-env agent deletes the job's working dir the other unpacked.
    temp = tempfile.mkdtemp(prefix="mdc", dir="/tmp")
    temp_worker = tempfile.mkdtemp(prefix="mdw", dir="/tmp")
    env = _env()
    gcs, dash, client, *agent = _free_ports(13)
    head = [
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--ray-client-server-port={client}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent[0]}",
        f"--dashboard-agent-grpc-port={agent[1]}",
        f"--metrics-export-port={agent[2]}",
        f"--runtime-env-agent-port={agent[3]}",
        "--num-cpus=1",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    worker = [
        f"--address=127.0.0.1:{gcs}",
        "--node-ip-address=127.0.0.1",
        f"--dashboard-agent-listen-port={agent[4]}",
        f"--dashboard-agent-grpc-port={agent[5]}",
        f"--metrics-export-port={agent[6]}",
        f"--runtime-env-agent-port={agent[7]}",
        f"--node-manager-port={agent[8]}",
        f"--object-manager-port={agent[9]}",
        "--num-cpus=2",
        f"--temp-dir={temp_worker}",
        "--disable-usage-stats",
    ]
    try:
        _ray_start(head, env)
        _ray_start(worker, env)
        yield {"address": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}", "env": env, "temp": temp}
    finally:
        procs = _cluster_processes(temp) + _cluster_processes(temp_worker)
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(temp_worker, ignore_errors=True)


def _nodes(gcs: str, env: dict) -> int:
    code = f"import ray; ray.init(address={gcs!r}); print(sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def submitted(ray_local, demo_root, tmp_path_factory):
    """The ci chain submitted as a Ray job and followed to its end, then the cluster stopped:
    (job status, logs, workdir). ``ray_local`` first: this process must never join the test cluster."""
    with local_cluster() as cluster:
        return _submit(cluster, demo_root, tmp_path_factory)


def _submit(cluster, demo_root, tmp_path_factory):
    assert _nodes(cluster["gcs"], cluster["env"]) == 2
    workdir = tmp_path_factory.mktemp("cluster") / "work"
    job = f"mdlda-test-{int(time.time())}"
    args = ["--config", "tune_spaces/ci.yaml", "--data", str(demo_root), "--workdir", str(workdir)]
    args += ["--address", cluster["address"], "--id", job, "--follow"]
    sub = subprocess.run(
        ["bash", str(ROOT / "cluster" / "submit.sh"), *args],
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
    )
    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", cluster["address"], job],
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return status.stdout + status.stderr, sub.stdout + sub.stderr, workdir


def test_submitted_chain_finishes_and_records_to_mlflow(submitted):
    from mlflow.tracking import MlflowClient

    status, logs, workdir = submitted
    assert re.search(r"Job '[\w-]+' succeeded", status), status + logs[-4000:]
    assert "mean Pearson r and RMSE" in logs  # the chain's summary table, printed by the job
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mdlda-ci")
    parents = client.search_runs([exp.experiment_id], "tags.`mdlda.chain` != ''")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["mdlda.student"].startswith("models:/mdlda-student/")
    teachers = client.search_model_versions("name='mdlda-teacher'")
    assert len(teachers) == 2
    assert client.get_model_version_by_alias("mdlda-student", "champion").version


def test_models_and_checkpoints_load_where_the_cluster_never_was(submitted, tmp_path):
    """With the cluster stopped: copy the Ray storage folder elsewhere, then in a fresh process without Ray load every
    registered model from the tracking store and every selected teacher's checkpoint from the copy."""
    status, _, workdir = submitted
    assert re.search(r"Job '[\w-]+' succeeded", status), status
    copy = tmp_path / "ray_results"
    shutil.copytree(workdir / "ray_results", copy)
    script = f"""
import json, sys
import mlflow, numpy as np, torch
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis
from mdlda.checkpoints import load_training_state
assert "ray" not in sys.modules or not __import__("ray").is_initialized()
mlflow.set_tracking_uri("sqlite:///{workdir / "mlflow.db"}")
client = MlflowClient()
audio = torch.from_numpy(np.random.default_rng(0).uniform(-0.3, 0.3, (2, 330_750)).astype(np.float32))
loaded, checkpoints = [], []
for name in ("mdlda-teacher", "mdlda-student"):
    for v in client.search_model_versions(f"name='{{name}}'"):
        out = mlflow.pytorch.load_model(f"models:/{{name}}/{{v.version}}")(audio)
        assert tuple(out.shape) == (2, 7) and torch.isfinite(out).all()
        loaded.append(f"{{name}}/{{v.version}}")
        if name == "mdlda-teacher":
            sweep = "{copy}/" + v.tags["sweep"]
            analysis = ExperimentAnalysis(sweep)
            trial = next(t for t in analysis.trials if t.trial_id == v.tags["trial_id"])
            ckpt = analysis.get_last_checkpoint(trial)
            state = load_training_state(ckpt.path)
            assert state["best_model"] or state["model"]
            checkpoints.append(ckpt.path)
print(json.dumps({{"loaded": loaded, "checkpoints": checkpoints}}))
"""
    env = {k: v for k, v in _env().items() if not k.startswith("RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["loaded"]) == 3  # two teachers and the student
    assert len(result["checkpoints"]) == 2 and all(p.startswith(str(copy)) for p in result["checkpoints"])
