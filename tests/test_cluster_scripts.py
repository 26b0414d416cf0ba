"""The cluster shell scripts, run against fake aws/ray/ssh/rsync/mlflow commands (no cluster, no network)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_cluster_configs import CLUSTER, ROOT, SCRIPTS, WORLD, commands, load  # noqa: F401


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_script_parses(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_shell_scripts_pass_shellcheck():
    # Catches what bash -n cannot, e.g. backticks in an unquoted here-document that would run a command.
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout


def test_wait_for_gpus_needs_a_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ in cluster/
    spec = importlib.util.spec_from_file_location("wait_for_gpus", CLUSTER / "wait_for_gpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.main(["--gpus", "1"])  # refused before it connects to Ray


# A fake command: appends its name and arguments to $FAKE_LOG (\x1f between fields, \x1e after each call),
# then runs a bash body. Bash, not Python, so that a test with twenty calls stays fast.
RECORDER = """#!/usr/bin/env bash
printf '%s\\x1f' "${{0##*/}}" "$@" >> "$FAKE_LOG"; printf '\\x1e' >> "$FAKE_LOG"
{body}
"""


class Fakes:
    """Fake commands in a bin/ folder first on PATH; ``calls()`` lists what they were run with."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        self.log = root / "calls.log"

    def __call__(self, name: str, body: str = "") -> None:
        exe = self.bin / name
        exe.write_text(RECORDER.format(body=body))
        exe.chmod(0o755)

    def calls(self) -> list[list[str]]:
        records = self.log.read_text().split("\x1e") if self.log.exists() else []
        return [r.split("\x1f")[:-1] for r in records if r]


@pytest.fixture
def fakes(tmp_path, monkeypatch) -> Fakes:
    fake = Fakes(tmp_path)
    monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(fake.log))
    monkeypatch.setenv("FAKE_PYTHON", sys.executable)
    monkeypatch.setenv("PYTHON", sys.executable)  # _head.sh reads the cluster YAML with it
    for var in (
        "MLFLOW_BACKEND_URI",
        "MLFLOW_HOST",
        "MLFLOW_WORKERS",
        "MLFLOW_AUTH_DATABASE_URI",
        "MLFLOW_AUTH_ADMIN_USERNAME",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "RAY_AUTH_MODE",
        "RAY_DASHBOARD_ADDRESS",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("MDLDA_SHARED", raising=False)
    return fake


def run(script: str, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", str(CLUSTER / script), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


FAKE_AWS = """
case "$1 $2" in
  "sts get-caller-identity") echo 123456789012 ;;
  "ec2 describe-security-groups") echo None ;;
  "ec2 create-security-group") echo sg-0fake ;;
  "iam get-role" | "iam get-instance-profile") exit 254 ;;
  "efs describe-file-systems") [[ " $* " == *" --file-system-id "* ]] && echo available || echo None ;;
  "efs create-file-system") echo fs-0fake ;;
  "efs describe-mount-targets") echo 0 ;;
esac
"""
PREREQS_ENV = {"VPC_ID": "vpc-1", "SUBNET_ID": "subnet-1", "BUCKET": "bkt"}
WORKER_READS = "arn:aws:s3:::bkt/mdlda/mlartifacts/*"


def _actions(statement: dict) -> list[str]:
    action = statement["Action"]
    return action if isinstance(action, list) else [action]


def test_aws_prereqs_opens_ssh_to_admin_only(fakes):
    fakes("aws", FAKE_AWS)
    out = run("aws_prereqs.sh", env={**PREREQS_ENV, "ADMIN_CIDR": "203.0.113.7/32"}).stdout
    calls = fakes.calls()
    assert not [c for c in calls if any(w in " ".join(c) for w in WORLD)]
    [ingress] = [c for c in calls if c[1:3] == ["ec2", "authorize-security-group-ingress"]]
    rules = json.loads(ingress[ingress.index("--ip-permissions") + 1])
    [ssh] = [r for r in rules if r.get("FromPort") == 22]
    assert [r["CidrIp"] for r in ssh["IpRanges"]] == ["203.0.113.7/32"]
    others = [r for r in rules if r is not ssh]
    assert others  # everything else only from members of the same group
    assert all(not r.get("IpRanges") and [g["GroupId"] for g in r["UserIdGroupPairs"]] == ["sg-0fake"] for r in others)
    policies = {
        c[c.index("--role-name") + 1]: json.loads(c[c.index("--policy-document") + 1])
        for c in calls
        if c[1:3] == ["iam", "put-role-policy"]
    }
    head = json.dumps(policies["mdlda-ray-head"])
    assert "arn:aws:iam::123456789012:role/mdlda-ray-worker" in head and '"iam:PassRole"' in head
    assert '"ec2:' not in json.dumps(policies["mdlda-ray-worker"])
    for policy in policies.values():
        for st in policy["Statement"]:
            if any(a.startswith("s3:") for a in _actions(st)):
                assert st["Resource"] in {"arn:aws:s3:::bkt", "arn:aws:s3:::bkt/mdlda/*", WORKER_READS}
    # Workers read the model artifacts and write nothing to S3: the chain writes to EFS and through the MLflow server.
    worker = policies["mdlda-ray-worker"]["Statement"]
    assert {a for st in worker for a in _actions(st)} == {"s3:GetObject", "s3:ListBucket"}
    [get] = [st for st in worker if "s3:GetObject" in _actions(st)]
    assert get["Resource"] == WORKER_READS
    [listing] = [st for st in worker if "s3:ListBucket" in _actions(st)]
    assert listing["Condition"]["StringLike"]["s3:prefix"] == ["mdlda/mlartifacts/*"]
    assert '"s3:PutObject"' in head  # the head's MLflow server writes the artifacts
    assert "sg-0fake" in out and "fs-0fake.efs.us-west-2.amazonaws.com:/" in out


def test_aws_prereqs_refuses_world_ssh(fakes):
    fakes("aws", FAKE_AWS)
    proc = run("aws_prereqs.sh", env={**PREREQS_ENV, "ADMIN_CIDR": "0.0.0.0/0"}, check=False)
    assert proc.returncode != 0 and "refusing" in proc.stderr
    assert fakes.calls() == []


FAKE_MLFLOW = """
printf '%s\\n' "$MLFLOW_AUTH_CONFIG_PATH" "$MLFLOW_AUTH_ADMIN_USERNAME" "$MLFLOW_AUTH_ADMIN_PASSWORD" \\
  "$MLFLOW_FLASK_SERVER_SECRET_KEY" > "$FAKE_LOG.env"
"$FAKE_PYTHON" -S - "$@" <<'EOF'
import http.server, sys
host, port = sys.argv[sys.argv.index("--host") + 1], int(sys.argv[sys.argv.index("--port") + 1])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer((host, port), Health).serve_forever()
EOF
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PASSWORD = "a-long-test-password"


def credentials_file(path: Path, user: str = "mdlda", password: str = PASSWORD, mode: int = 0o600) -> Path:
    """An MLflow client credentials file, as cluster/README.md tells people to write it."""
    path.write_text(f"[mlflow]\nmlflow_tracking_username = {user}\nmlflow_tracking_password = {password}\n")
    path.chmod(mode)
    return path


def test_start_mlflow_is_idempotent_and_stops(fakes, tmp_path):
    if not shutil.which("curl"):
        pytest.skip("start_mlflow.sh polls the server with curl")
    fakes("mlflow", FAKE_MLFLOW)
    env = {"MLFLOW_RUN_DIR": str(tmp_path / "run"), "MLFLOW_START_TIMEOUT_S": "10"}
    port = str(_free_port())
    args = [
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--store",
        f"{tmp_path}/db",
        "--artifacts",
        f"{tmp_path}/art",
        "--credentials",
        str(credentials_file(tmp_path / "credentials")),
    ]
    try:
        assert "running (pid" in run("start_mlflow.sh", *args, env=env).stdout
        assert "already running" in run("start_mlflow.sh", *args, env=env).stdout
        [call] = fakes.calls()  # started once
        assert call[call.index("--host") + 1] == "127.0.0.1" and "--serve-artifacts" in call
        assert call[call.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/db/mlflow.db"
        assert call[call.index("--workers") + 1] == "1"
        assert call[call.index("--app-name") + 1] == "basic-auth"
        # The server got the admin's login through its environment, and nowhere else.
        ini_path, user, password, secret = (tmp_path / "calls.log.env").read_text().splitlines()
        assert (user, password) == ("mdlda", PASSWORD) and len(secret) >= 32
        assert PASSWORD not in " ".join(call)
        ini = (tmp_path / "run" / "basic_auth.ini").read_text()
        assert ini_path == str(tmp_path / "run" / "basic_auth.ini") and PASSWORD not in ini
        assert f"database_uri = sqlite:///{tmp_path}/db/basic_auth.db" in ini and "default_permission = READ" in ini
        for private in (tmp_path / "run", tmp_path / "run" / "flask_secret_key"):
            assert private.stat().st_mode & 0o077 == 0, private
        assert PASSWORD not in "".join(p.read_text() for p in (tmp_path / "run").iterdir())
    finally:
        assert "stopped" in run("start_mlflow.sh", "--stop", env=env).stdout
    assert not (tmp_path / "run" / "server.pid").exists()


def test_start_mlflow_refuses_to_start_without_a_login(fakes, tmp_path):
    fakes("mlflow", FAKE_MLFLOW)
    base = ["--dry-run", "--host", "10.0.0.5", "--store", "/srv/m", "--artifacts", "s3://b/a"]
    env = {"MLFLOW_RUN_DIR": str(tmp_path / "run")}

    def refused(*args: str, extra: dict | None = None) -> str:
        proc = run("start_mlflow.sh", *base, *args, env={**env, **(extra or {})}, check=False)
        assert proc.returncode != 0, proc.stdout
        return proc.stderr

    missing = tmp_path / "nowhere" / "credentials"
    assert f"no admin credentials: {missing} does not exist" in refused("--credentials", str(missing))
    shared = credentials_file(tmp_path / "shared", mode=0o644)
    assert f"chmod 600 {shared}" in refused("--credentials", str(shared))
    assert "at least 12 characters" in refused("--credentials", str(credentials_file(tmp_path / "s", password="x")))
    no_password = tmp_path / "np"
    no_password.write_text("[mlflow]\nmlflow_tracking_username = mdlda\n")
    no_password.chmod(0o600)
    assert "has no mlflow_tracking_password" in refused("--credentials", str(no_password))
    not_ini = tmp_path / "ni"
    not_ini.write_text("mdlda:secret-password-1\n")
    not_ini.chmod(0o600)
    assert f"{not_ini} is not an MLflow credentials file" in refused("--credentials", str(not_ini))
    half = {"MLFLOW_AUTH_ADMIN_USERNAME": "mdlda"}
    assert "set both MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD" in refused(extra=half)
    assert fakes.calls() == []  # nothing was started
    assert not (tmp_path / "run").exists()  # nor written


def test_start_mlflow_takes_the_admin_from_the_environment(fakes, tmp_path):
    env = {"MLFLOW_AUTH_ADMIN_USERNAME": "root-of-mlflow", "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD}
    args = ["--dry-run", "--host", "10.0.0.5", "--artifacts", "s3://b/a", "--credentials", str(tmp_path / "none")]
    out = run("start_mlflow.sh", "--store", "/srv/m", *args, env=env).stdout
    assert "--app-name basic-auth" in out and "admin user root-of-mlflow" in out
    assert "sqlite:////srv/m/basic_auth.db" in out and PASSWORD not in out
    pg = {**env, "MLFLOW_BACKEND_URI": "postgresql://mlflow@db:5432/mlflow"}
    proc = run("start_mlflow.sh", *args, env=pg, check=False)
    assert proc.returncode != 0 and "MLFLOW_AUTH_DATABASE_URI" in proc.stderr  # PostgreSQL, and no user database
    pg["MLFLOW_AUTH_DATABASE_URI"] = "postgresql://mlflow@db:5432/mlflow_auth"
    assert "users and permissions in postgresql" in run("start_mlflow.sh", *args, env=pg).stdout


def test_start_mlflow_binds_private_address_with_sane_workers(fakes, tmp_path):
    s3 = ["--artifacts", "s3://b/mdlda/mlartifacts", "--credentials", str(credentials_file(tmp_path / "credentials"))]
    refused = run("start_mlflow.sh", "--host", "0.0.0.0", "--store", "/srv/m", *s3, check=False)
    assert refused.returncode != 0 and "refusing" in refused.stderr
    addresses = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    if addresses:
        assert run("start_mlflow.sh", "--print-uri").stdout.strip() == f"http://{addresses[0]}:5000"
    sqlite = run("start_mlflow.sh", "--dry-run", "--host", "10.0.0.5", "--store", "/srv/m", *s3).stdout
    assert "--workers 1" in sqlite and "sqlite:////srv/m/mlflow.db" in sqlite and "--host 10.0.0.5" in sqlite
    assert "--artifacts-destination s3://b/mdlda/mlartifacts" in sqlite and "--serve-artifacts" in sqlite
    pg = {
        "MLFLOW_BACKEND_URI": "postgresql://mlflow@db:5432/mlflow",
        "MLFLOW_AUTH_DATABASE_URI": "postgresql://mlflow@db:5432/mlflow_auth",
    }
    postgres = run("start_mlflow.sh", "--dry-run", "--host", "10.0.0.5", *s3, env=pg).stdout
    assert "--workers 4" in postgres and "--backend-store-uri postgresql://mlflow@db:5432/mlflow" in postgres
    too_many = run("start_mlflow.sh", "--dry-run", "--store", "/srv/m", *s3, "--workers", "2", check=False)
    assert too_many.returncode != 0 and "one writer" in too_many.stderr


def test_submit_builds_the_job(fakes, tmp_path):
    fakes("ray", 'echo "RAY_AUTH_MODE=$RAY_AUTH_MODE"')
    token = tmp_path / "auth_token"
    token.write_text("x")
    # Any file inside the repository stands in for a tune_spaces/ config: submit.sh only checks where it is.
    args = ["--config", "ray_cluster.yaml", "--workdir", "/mnt/mdlda/work/r1", "--gpus", "2"]
    args += ["--mlflow-uri", "http://10.0.0.5:5000", "--id", "job-1", "--", "--extra", "a b"]
    out = run("submit.sh", *args, env={"RAY_AUTH_TOKEN_PATH": str(token)}).stdout
    [call] = fakes.calls()
    assert call[1:3] == ["job", "submit"]
    assert call[call.index("--address") + 1] == "http://127.0.0.1:8265"
    assert call[call.index("--working-dir") + 1] == str(ROOT)
    assert call[call.index("--submission-id") + 1] == "job-1"
    runtime_env = json.loads(call[call.index("--runtime-env-json") + 1])
    assert runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://10.0.0.5:5000"}
    assert {".venv", ".git"} <= set(runtime_env["excludes"])
    entrypoint = call[call.index("--") + 1 :]
    assert entrypoint[:5] == ["python", "cluster/wait_for_gpus.py", "--gpus", "2", "--"]
    assert entrypoint[5:] == ["mdlda", "run", "--config", "ray_cluster.yaml", "--data", "/mnt/mdlda/data"] + [
        "--workdir",
        "/mnt/mdlda/work/r1",
        "--extra",
        "a b",
    ]
    assert "RAY_AUTH_MODE=token" in out  # the fake ray saw token auth
    assert "ray job logs -f --address http://127.0.0.1:8265 job-1" in out and "ray job status" in out


def test_submit_refuses_what_the_cluster_cannot_see(fakes, tmp_path):
    fakes("ray")
    (tmp_path / "auth_token").write_text("x")
    outside = tmp_path / "c.yaml"
    outside.write_text("{}")
    proc = run(
        "submit.sh",
        "--config",
        str(outside),
        env={"RAY_AUTH_TOKEN_PATH": str(tmp_path / "auth_token")},
        check=False,
    )
    assert proc.returncode != 0 and "outside the repository" in proc.stderr
    no_token = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}
    proc = run("submit.sh", "--config", "ray_cluster.yaml", env=no_token, check=False)
    assert proc.returncode != 0 and "no token" in proc.stderr
    assert fakes.calls() == []


FAKE_RAY_HEAD = """
case "$1" in
  get-head-ip) echo "Fetched IP: 203.0.113.5"; echo 203.0.113.5 ;;
  exec) echo "Loaded cached provider configuration"; echo http://10.0.1.23:5000 ;;
esac
"""


def test_tunnel_forwards_mlflow_private_address_and_dashboard(fakes):
    fakes("ray", FAKE_RAY_HEAD)
    fakes("ssh")
    run("tunnel.sh", "ray_cluster.yaml", "--mlflow-port", "5001")
    [ssh] = [c for c in fakes.calls() if c[0] == "ssh"]
    assert ssh[-1] == "ubuntu@203.0.113.5"
    assert [ssh[i + 1] for i, a in enumerate(ssh) if a == "-L"] == [
        "5001:10.0.1.23:5000",
        "8265:127.0.0.1:8265",
    ]
    assert ssh[ssh.index("-i") + 1] == os.path.expanduser(load("aws")["auth"]["ssh_private_key"])


def test_fetch_results_skips_shards_and_checkpoints(fakes, tmp_path):
    fakes("ray", FAKE_RAY_HEAD)
    fakes("rsync")
    run("fetch_results.sh", "--workdir", "/mnt/mdlda/work/r1", "--to", f"{tmp_path}/res")
    [rsync] = [c for c in fakes.calls() if c[0] == "rsync"]
    assert rsync[-2:] == ["ubuntu@203.0.113.5:/mnt/mdlda/work/r1/", f"{tmp_path}/res/"]
    assert "*.parquet" in rsync and "checkpoint_*/" in rsync
