"""Preflight: refuse a multi-node run whose storage would not survive it, before any compute starts.

On a cluster, the workdir (shards, Ray Tune/Train storage under ``ray_results/``) and MLflow's artifact root must
be reachable from every node: a checkpoint written to a node-local disk is lost with the node, and a model
registered into a node-local artifact root cannot be loaded anywhere else. Remote URIs (``s3://``, ``gs://``,
an MLflow server's ``mlflow-artifacts:/``) are fine. A local path is fine when it is shared storage mounted on
every node (NFS/EFS, as cluster/README.md sets up): that is checked, not assumed, by writing a marker file from
the driver and looking for it with a zero-CPU task pinned to each alive node. With one node there is nothing to
check.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import ray


class DurabilityError(RuntimeError):
    """A storage location of a multi-node run is node-local; the message names it and the fix."""


@dataclass(frozen=True)
class Location:
    label: str  # what is stored there, for the message
    uri: str
    fix: str


def local_path(uri: str) -> str | None:
    """The file-system path of a local location (a plain path, ``file://`` or ``sqlite:///``), None if remote."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///") :]).parent)
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return parsed.path
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and uri[1:3] in (":\\", ":/")):  # also C:\ paths
        return uri
    return None


@ray.remote(num_cpus=0)
def _sees(path: str) -> bool:
    return os.path.exists(path)


def nodes_missing(path: str, nodes: list[dict]) -> list[str]:
    """Ids of the ``nodes`` (``ray.nodes()`` entries) on which a marker written here under ``path`` is absent."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    Path(path).mkdir(parents=True, exist_ok=True)
    marker = Path(path) / f".mdlda-shared-{uuid.uuid4().hex}"
    marker.write_text("written by the driver's preflight check")
    try:
        futures = {
            n["NodeID"]: _sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker))
            for n in nodes
        }
        seen = ray.get(list(futures.values()), timeout=120)
        return [node for node, ok in zip(futures, seen, strict=True) if not ok]
    finally:
        marker.unlink(missing_ok=True)


def problems(locations: list[Location], missing: dict[str, list[str]]) -> list[str]:
    """Messages for the locations some node cannot see (``missing``: label -> node ids)."""
    out = []
    for loc in locations:
        nodes = missing.get(loc.label) or []
        if nodes:
            ids = ", ".join(n[:8] for n in nodes)
            out.append(f"{loc.label} {loc.uri} is node-local: {len(nodes)} node(s) ({ids}) cannot see it. {loc.fix}")
    return out


def chain_locations(workdir: Path, tracking_uri: str, artifact_root: str | None) -> list[Location]:
    locs = [
        Location(
            "the workdir (shards, Ray storage)",
            str(workdir),
            "Put --workdir on a file system every node mounts at the same path (EFS/NFS; cluster/README.md).",
        )
    ]
    if tracking_uri.startswith("sqlite:"):
        locs.append(
            Location(
                "the MLflow SQLite store",
                tracking_uri,
                "Start the tracking server on the head node (cluster/start_mlflow.sh) and set MLFLOW_TRACKING_URI.",
            )
        )
    if artifact_root:
        locs.append(
            Location(
                "the MLflow artifact root",
                artifact_root,
                "Use an s3:// artifact root, or a server with --serve-artifacts (cluster/start_mlflow.sh).",
            )
        )
    return locs


def check_durability(workdir: str | Path, tracking_uri: str, artifact_root: str | None) -> int:
    """Raise DurabilityError when a multi-node Ray cluster cannot see one of the chain's storage locations;
    returns the number of alive nodes checked."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return len(nodes)
    locations = chain_locations(Path(workdir), tracking_uri, artifact_root)
    missing = {}
    for loc in locations:
        path = local_path(loc.uri)
        if path is not None:
            missing[loc.label] = nodes_missing(path, nodes)
    found = problems(locations, missing)
    if found:
        raise DurabilityError(
            f"refusing to run on this {len(nodes)}-node Ray cluster: its results would not be durable.\n  "
            + "\n  ".join(found)
        )
    return len(nodes)
