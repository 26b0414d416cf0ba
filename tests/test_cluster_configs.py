"""The cluster configs (ray_cluster.yaml, cluster/onprem.yaml) and the scripts in cluster/.

No cluster and no network: the configs go through the validation `ray up` runs before it contacts a cloud
(``prepare_config`` + ``validate_config``), and the shell scripts run against fake ``aws``, ``ray``, ``ssh``,
``rsync`` and ``mlflow`` commands that record what they were asked to do.
"""

from __future__ import annotations

import re
import socket
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
            if where.startswith(".file_mounts."):  # a file copied from your machine: named by its path only
                assert str(key).startswith(("~/", "/")) and str(value).startswith(("~/", "/", "./")), where
                continue
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
    # MLflow's client reads this file itself on every node; the head's first start makes the admin from it.
    assert cfg["file_mounts"]["~/.mlflow/credentials"] == "~/.mlflow/credentials"
    assert "chmod 600 ~/.ray/auth_token ~/.mlflow/credentials" in commands(cfg, "setup_commands")
    assert (ROOT / cfg["file_mounts"]["~/mdlda-cluster"]).resolve() == CLUSTER


def test_onprem_head_address_agrees_with_head_ip():
    cfg = load("onprem")
    assert cfg["provider"]["type"] == "local" and "available_node_types" not in cfg
    head_start = " ".join(commands(cfg, "head_start_ray_commands"))
    ips = set(re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", head_start))
    assert ips - {"127.0.0.1"} == {cfg["provider"]["head_ip"]}  # Ray's node address, MLflow's bind and URI
    assert "--artifacts /mnt/shared/" in head_start  # artifacts on the shared file system
