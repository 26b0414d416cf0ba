"""The tracking server's login, on a real server: cluster/start_mlflow.sh starts `mlflow server --app-name basic-auth`
on 127.0.0.1 (a free port, a temp backend store, auth database, artifact folder and run folder, the admin from a
temp credentials file). Without the right password every API and artifact request is refused (401); with it,
experiments, runs and proxied artifacts work; a second user created through the auth app reads what the admin owns
but writes it only once the admin grants it (403 before). The server is stopped with the script's own --stop,
whatever the tests did.

Slow: a fresh server migrates two SQLite databases (~10 s on an idle 2-CPU machine, minutes on a loaded one).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "start_mlflow.sh"
ADMIN, PASSWORD = "mdlda-admin", "a-long-test-password"
# Variables of the caller's shell that would change which server, store or login the tests use.
FOREIGN = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_BACKEND_URI",
    "MLFLOW_AUTH_DATABASE_URI",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_AUTH_CONFIG_PATH",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "MLFLOW_HOST",
    "MLFLOW_WORKERS",
)


@dataclass(frozen=True)
class Server:
    uri: str
    home: Path  # a HOME whose ~/.mlflow/credentials holds the admin's login
    store: Path


def write_credentials(path: Path, user: str, password: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"[mlflow]\nmlflow_tracking_username = {user}\nmlflow_tracking_password = {password}\n")
    path.chmod(0o600)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not shutil.which("curl"):
        pytest.skip("start_mlflow.sh polls the server with curl")
    tmp = tmp_path_factory.mktemp("mlflow_auth")
    home = tmp / "home"
    write_credentials(home / ".mlflow" / "credentials", ADMIN, PASSWORD)
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # this venv's `mlflow`
        HOME=str(home),
        MLFLOW_RUN_DIR=str(tmp / "run"),
        MLFLOW_START_TIMEOUT_S="240",
    )
    port = _free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--store", str(tmp / "db"), "--artifacts", str(tmp / "art")]
    try:
        started = _script(*args, env=env, timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "with a login" in started.stdout
        yield Server(uri=f"http://127.0.0.1:{port}", home=home, store=tmp / "db")
    finally:
        stopped = _script("--stop", env=env, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the server still answers after --stop"


def request(url: str, auth: tuple[str, str] | None = None, method: str = "GET", body: dict | bytes | None = None):
    """(status, body) of one HTTP request, with basic auth when ``auth`` is given."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method)
    if isinstance(body, dict):
        req.add_header("Content-Type", "application/json")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def logged_out(monkeypatch, tmp_path):
    """No login from the environment nor from a credentials file."""
    for var in FOREIGN:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.fixture
def own_tracking_uri(monkeypatch):
    """MLflow's process-wide tracking URI is put back after the test (``setup_tracking`` sets it)."""
    import mlflow.tracking._tracking_service.utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)


def test_requests_without_the_password_are_refused(server):
    search = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=5"
    status, _ = request(search)
    assert status == 401
    assert request(search, auth=(ADMIN, "not-the-password"))[0] == 401
    assert request(search, auth=("nobody", PASSWORD))[0] == 401
    created = request(f"{server.uri}/api/2.0/mlflow/experiments/create", method="POST", body={"name": "intruder"})
    assert created[0] == 401
    # Artifact uploads go through the same login (--serve-artifacts proxies them).
    upload = f"{server.uri}/api/2.0/mlflow-artifacts/artifacts/0/planted.txt"
    assert request(upload, method="PUT", body=b"x")[0] == 401
    assert not list((server.store.parent / "art").rglob("planted.txt"))
    # Only the health check is open: it is what start_mlflow.sh polls.
    assert request(f"{server.uri}/health")[0] == 200
    status, body = request(search, auth=(ADMIN, PASSWORD))
    assert status == 200, body


def test_the_credentials_file_logs_the_client_in(server, logged_out, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    with pytest.raises(Exception, match="401"):
        client.search_experiments()
    monkeypatch.setenv("HOME", str(server.home))  # MLflow's client reads ~/.mlflow/credentials itself
    exp_id = client.create_experiment("login-check")
    assert exp_id in [e.experiment_id for e in client.search_experiments()]
    run = client.create_run(exp_id)
    client.log_param(run.info.run_id, "lr", "0.01")
    (tmp_path / "note.txt").write_text("through the proxy")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    got = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "back"))
    assert Path(got).read_text() == "through the proxy"
    assert client.get_run(run.info.run_id).data.params == {"lr": "0.01"}


def test_a_second_user_reads_and_writes_only_what_the_admin_grants(server, logged_out, monkeypatch):
    # The admin's part as cluster/README.md shows it: MLflow's auth client, logged in by the credentials file.
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("HOME", str(server.home))
    users = get_app_client("basic-auth", tracking_uri=server.uri)
    client = MlflowClient(server.uri)
    exp_id = client.create_experiment("owned")
    reader = ("reader", "another-long-password")
    users.create_user(username=reader[0], password=reader[1])
    # Not an admin: creating users is refused.
    denied = request(
        f"{server.uri}/api/2.0/mlflow/users/create", reader, "POST", {"username": "x", "password": "y" * 12}
    )
    assert denied[0] == 403

    def as_reader(on: bool) -> None:  # the environment variables win over the credentials file
        for var, value in (("MLFLOW_TRACKING_USERNAME", reader[0]), ("MLFLOW_TRACKING_PASSWORD", reader[1])):
            if on:
                monkeypatch.setenv(var, value)
            else:
                monkeypatch.delenv(var)

    as_reader(True)
    assert client.get_experiment(exp_id).name == "owned"  # default_permission READ
    with pytest.raises(MlflowException) as refused:
        client.create_run(exp_id)
    assert refused.value.error_code == "PERMISSION_DENIED"
    as_reader(False)
    users.grant_user_permission(username=reader[0], resource_type="experiment", resource_id=exp_id, permission="EDIT")
    as_reader(True)
    assert client.create_run(exp_id).info.experiment_id == exp_id


def test_setup_tracking_says_to_log_in(server, logged_out, own_tracking_uri, monkeypatch, tmp_path):
    from mdlda.tracking import TrackingError, setup_tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        setup_tracking(tmp_path / "work", "mdlda-login")
    monkeypatch.setenv("HOME", str(server.home))
    assert setup_tracking(tmp_path / "work", "mdlda-login")
