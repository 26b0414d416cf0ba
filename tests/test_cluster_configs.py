"""The cluster configs (ray_cluster.yaml, cluster/onprem.yaml) and the scripts in cluster/.

No cluster and no network: the configs go through the validation `ray up` runs before it contacts a cloud
(``prepare_config`` + ``validate_config``), and the shell scripts run against fake ``aws``, ``ray``, ``ssh``,
``rsync`` and ``mlflow`` commands that record what they were asked to do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CONFIGS = {"aws": ROOT / "ray_cluster.yaml", "onprem": CLUSTER / "onprem.yaml"}
SCRIPTS = sorted(CLUSTER.glob("*.sh"))
TEXT_FILES = [
    *CONFIGS.values(),
    *sorted(p for p in CLUSTER.iterdir() if p.suffix in {".yaml", ".sh", ".py", ".md"}),
]
WORLD = {"0.0.0.0/0", "::/0"}
PUBLIC_PORTS = {22, 8265, 5000}


def load(name: str) -> dict:
    return yaml.safe_load(CONFIGS[name].read_text())


def commands(cfg: dict, *fields: str) -> list[str]:
    return [c for f in fields for c in cfg.get(f) or []]


@pytest.fixture
def offline(monkeypatch):
    """Opening an internet socket in this process fails the test (boto3, instance metadata, ...)."""
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access during config validation: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


# --- Ray's own validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ray_accepts_config(name, offline):
    # What `ray up` runs before it talks to the provider (autoscaler/_private/commands.py, _bootstrap_config):
    # merge the provider's defaults (for `local`, also build its single node type), then the JSON schema and
    # consistency checks. Neither needs boto3 or credentials; the provider bootstrap that follows does (it
    # creates key pairs, security groups, ...), so it is not run here.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(load(name))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_validator_catches_mistakes(offline):
    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    aws = load("aws")
    aws["available_node_types"]["gpu"]["min_worker"] = 0  # a typo
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(aws))
    onprem = load("onprem")
    onprem["available_node_types"] = {"x": {"resources": {}, "node_config": {}}}
    with pytest.raises(click.ClickException, match="not supported for on-premise"):
        prepare_config(onprem)


# --- what the configs must say ------------------------------------------------------------------------------


def _walk(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{path}.{k}", k, v
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")


CREDENTIAL_TEXT = re.compile(
    r"aws_access_key_id|aws_secret_access_key|aws_session_token|AKIA[0-9A-Z]{16}|BEGIN [A-Z ]*PRIVATE KEY"
    r"|://[^/\s:@]+:[^/\s@]+@",  # a password inside a URI
    re.IGNORECASE,
)


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: p.name)
def test_no_credentials(path):
    hits = CREDENTIAL_TEXT.findall(path.read_text())
    assert not hits, f"{path.name} holds credential-looking text: {hits}"
    if path.suffix == ".yaml":
        for where, key, value in _walk(yaml.safe_load(path.read_text())):
            assert not re.search(r"secret|password|access_key|credential", str(key), re.I), where
            if key == "ssh_private_key":
                assert str(value).startswith(("~/", "/")), f"{where} must be a path, not key material"


def test_aws_security_group_not_open_to_the_world():
    cfg = load("aws")
    # Without SecurityGroupIds, Ray creates its own group and adds SSH from 0.0.0.0/0
    # (aws/config.py, _create_default_ssh_inbound_rules), whatever provider.security_group says.
    for name, node_type in cfg["available_node_types"].items():
        assert node_type["node_config"].get("SecurityGroupIds"), f"{name} would get Ray's default group"
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
        cidrs |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
        ports = set(range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1))
        assert not (cidrs & WORLD and ports & PUBLIC_PORTS), rule


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_nothing_binds_every_interface(name):
    cfg = load(name)
    start = commands(cfg, "head_start_ray_commands", "worker_start_ray_commands")
    assert not [c for c in start if "0.0.0.0" in c]
    head_start = " ".join(commands(cfg, "head_start_ray_commands"))
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through SSH forwarding only
    assert "start_mlflow.sh" in head_start


def test_aws_autoscaling_and_idle_timeout():
    cfg = load("aws")
    assert 0 < cfg["idle_timeout_minutes"] <= 30
    head = cfg["available_node_types"][cfg["head_node_type"]]
    workers = {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}
    assert head["resources"].get("CPU") == 0  # trials and data tasks stay off the head
    assert workers and all(t["min_workers"] == 0 for t in workers.values())
    assert all(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    assert all(t["resources"].get("CPU", 0) >= 4 for t in workers.values())  # data loading needs cores
    assert 1 <= sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    assert cfg["provider"]["cache_stopped_nodes"] is False


def test_aws_names_shared_paths_consistently():
    cfg = load("aws")
    setup = " ".join(commands(cfg, "setup_commands"))
    region = cfg["provider"]["region"]
    assert re.search(rf"\.efs\.{region}\.amazonaws\.com:/ /mnt/mdlda\b", setup), "EFS outside the region"
    assert "s3://" in " ".join(commands(cfg, "head_start_ray_commands"))  # MLflow artifacts on S3
    profiles = {t["node_config"]["IamInstanceProfile"]["Arn"] for t in cfg["available_node_types"].values()}
    assert len(profiles) == 2, "head and workers need different instance profiles"


def _pins(text: str) -> dict[str, str]:
    pattern = r"\b(?P<name>ray|torch|torchaudio|mlflow)(?:\[[^\]]*\])?(?P<spec>==[0-9.*]+)"
    return {m["name"]: m["spec"] for m in re.finditer(pattern, text)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_setup_pins_match_pyproject(name):
    deps = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    wanted = _pins(deps)
    assert set(wanted) == {"ray", "torch", "torchaudio", "mlflow"}
    setup = " ".join(commands(load(name), "setup_commands"))
    assert _pins(setup) == wanted
    ray_extras = set(re.search(r"ray\[([^\]]*)\]", deps)[1].split(","))
    node_extras = set(re.search(r"ray\[([^\]]*)\]==", setup)[1].split(","))
    assert ray_extras | {"default"} <= node_extras  # the dashboard and job server need ray[default]
    assert re.search(r"git\+https://\S+@\S+", setup), "install the project from a pinned ref"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_node_gets_auth_mode_and_tracking_uri(name):
    cfg = load(name)
    for field in ("head_start_ray_commands", "worker_start_ray_commands"):
        [start] = [c for c in cfg[field] if "ray start" in c]
        # Exported in the same shell command as `ray start`: the raylet and its worker processes inherit them.
        assert "export RAY_AUTH_MODE=token;" in start, field
        assert start.index("MLFLOW_TRACKING_URI=") < start.index("ray start"), field
    [worker_start] = [c for c in cfg["worker_start_ray_commands"] if "ray start" in c]
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker_start
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the token's path, not its value
    assert (ROOT / cfg["file_mounts"]["~/mdlda-cluster"]).resolve() == CLUSTER


def test_onprem_head_address_agrees_with_head_ip():
    cfg = load("onprem")
    assert cfg["provider"]["type"] == "local" and "available_node_types" not in cfg
    head_start = " ".join(commands(cfg, "head_start_ray_commands"))
    ips = set(re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", head_start))
    assert ips - {"127.0.0.1"} == {cfg["provider"]["head_ip"]}  # Ray's node address, MLflow's bind and URI
    assert "--artifacts /mnt/shared/" in head_start  # artifacts on the shared file system


# --- the scripts --------------------------------------------------------------------------------------------


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
    assert all(
        not r.get("IpRanges") and [g["GroupId"] for g in r["UserIdGroupPairs"]] == ["sg-0fake"]
        for r in others
    )
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
                assert st["Resource"] in {"arn:aws:s3:::bkt", "arn:aws:s3:::bkt/mdlda/*"}
    assert "sg-0fake" in out and "fs-0fake.efs.us-west-2.amazonaws.com:/" in out


def test_aws_prereqs_refuses_world_ssh(fakes):
    fakes("aws", FAKE_AWS)
    proc = run("aws_prereqs.sh", env={**PREREQS_ENV, "ADMIN_CIDR": "0.0.0.0/0"}, check=False)
    assert proc.returncode != 0 and "refusing" in proc.stderr
    assert fakes.calls() == []


FAKE_MLFLOW = """
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
    ]
    try:
        assert "running (pid" in run("start_mlflow.sh", *args, env=env).stdout
        assert "already running" in run("start_mlflow.sh", *args, env=env).stdout
        [call] = fakes.calls()  # started once
        assert call[call.index("--host") + 1] == "127.0.0.1" and "--serve-artifacts" in call
        assert call[call.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/db/mlflow.db"
        assert call[call.index("--workers") + 1] == "1"
    finally:
        assert "stopped" in run("start_mlflow.sh", "--stop", env=env).stdout
    assert not (tmp_path / "run" / "server.pid").exists()


def test_start_mlflow_binds_private_address_with_sane_workers(fakes):
    s3 = ["--artifacts", "s3://b/mdlda/mlartifacts"]
    refused = run("start_mlflow.sh", "--host", "0.0.0.0", "--store", "/srv/m", *s3, check=False)
    assert refused.returncode != 0 and "refusing" in refused.stderr
    addresses = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    if addresses:
        assert run("start_mlflow.sh", "--print-uri").stdout.strip() == f"http://{addresses[0]}:5000"
    sqlite = run("start_mlflow.sh", "--dry-run", "--host", "10.0.0.5", "--store", "/srv/m", *s3).stdout
    assert "--workers 1" in sqlite and "sqlite:////srv/m/mlflow.db" in sqlite and "--host 10.0.0.5" in sqlite
    assert "--artifacts-destination s3://b/mdlda/mlartifacts" in sqlite and "--serve-artifacts" in sqlite
    pg = {"MLFLOW_BACKEND_URI": "postgresql://mlflow@db:5432/mlflow"}
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
