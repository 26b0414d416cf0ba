"""The durability preflight: which locations are local, which messages a node-local location gets, and the real
visibility probe on the session's local Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.preflight import Location, chain_locations, local_path, problems


def test_local_and_remote_locations():
    assert local_path("/mnt/mdlda/work") == "/mnt/mdlda/work"
    assert local_path("file:///mnt/x/mlartifacts") == "/mnt/x/mlartifacts"
    assert local_path("sqlite:////mnt/mdlda/work/mlflow.db") == "/mnt/mdlda/work"
    for remote in ("s3://bucket/mlartifacts", "gs://b/x", "mlflow-artifacts:/1/abc", "http://10.0.0.1:5000"):
        assert local_path(remote) is None, remote


def test_node_local_locations_are_named_with_the_fix():
    locs = chain_locations(Path("/data/work"), "sqlite:////data/work/mlflow.db", "file:///data/work/mlartifacts")
    assert [loc.label for loc in locs] == [
        "the workdir (shards, Ray storage)",
        "the MLflow SQLite store",
        "the MLflow artifact root",
    ]
    found = problems(locs, {"the MLflow artifact root": ["f" * 56], "the workdir (shards, Ray storage)": []})
    assert len(found) == 1
    assert "file:///data/work/mlartifacts is node-local: 1 node(s) (ffffffff)" in found[0]
    assert "s3://" in found[0]  # the fix
    server = chain_locations(Path("/efs/work"), "http://10.0.0.1:5000", "mlflow-artifacts:/1")
    assert [loc.label for loc in server] == ["the workdir (shards, Ray storage)", "the MLflow artifact root"]
    assert problems([Location("x", "/tmp/x", "fix")], {}) == []


@pytest.mark.slow
def test_probe_sees_a_path_from_every_node_of_the_local_ray(ray_local, tmp_path):
    import ray

    from pipelines.preflight import check_durability, nodes_missing

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert nodes_missing(str(tmp_path / "shared"), nodes) == []
    assert list((tmp_path / "shared").iterdir()) == []  # the marker is removed
    # one node: nothing to check, whatever the locations
    assert check_durability(tmp_path, f"sqlite:///{tmp_path}/mlflow.db", (tmp_path / "a").as_uri()) == 1
