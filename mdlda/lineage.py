"""Lineage: which data, sweep, teachers and pseudo-labels made a registered model, every link checked.

The chain writes the links as ``lineage.*`` tags on every registered model version (and on the stage run that
made it, so the MLflow UI shows them): the chain's parent run, the content digests of the shards the model was
trained on and the run that logged those manifests in full, the sweep run, and for the student the teacher
versions and the pseudo-label run. :func:`trace` reads them back and resolves each link against the tracking
store: runs must exist, teacher versions must exist (and are traced in turn), and every digest must equal the
one in the manifest logged with the run.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

PREFIX = "lineage."
SHARD_SETS = ("midlevel", "maestro", "pseudolabels")


def manifest_artifact(name: str) -> str:
    return f"manifest-{name}.json"


class LineageError(RuntimeError):
    """The model URI does not name a registered version, or it carries no lineage."""


@dataclass
class Link:
    kind: str  # "run", "model", "shards"
    role: str  # e.g. "chain", "prepare", "sweep", "teacher-1", "shards:midlevel"
    ref: str  # run id, model URI, or content digest
    ok: bool
    detail: str = ""
    children: list[Link] = field(default_factory=list)

    def broken(self) -> list[Link]:
        return ([] if self.ok else [self]) + [b for c in self.children for b in c.broken()]

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_version(client: MlflowClient, uri: str):
    """``models:/name@alias`` or ``models:/name/version`` -> the ModelVersion."""
    from mdlda.served import parse_model_uri, registry_version

    try:
        parsed = parse_model_uri(uri)
    except ValueError as exc:
        raise LineageError(str(exc)) from exc
    if parsed.model_id is not None:  # a logged model is no registered version: it carries no lineage tags
        raise LineageError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION (a registered version)")
    try:
        return registry_version(client, parsed)
    except MlflowException as exc:
        raise LineageError(f"{uri}: not in the registry ({exc.message.splitlines()[0]})") from exc


def _run(client: MlflowClient, role: str, run_id: str | None) -> Link:
    if not run_id:
        return Link("run", role, "", False, "no link recorded")
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return Link("run", role, run_id, False, "run not found in the tracking store")
    name = run.info.run_name or ""
    return Link("run", role, run_id, True, f"{name} [{run.info.status}]")


def _manifest(client: MlflowClient, run_id: str, artifact: str) -> dict | None:
    with tempfile.TemporaryDirectory() as d:
        try:
            path = client.download_artifacts(run_id, artifact, d)
        except (MlflowException, OSError):
            return None
        return json.loads(Path(path).read_text())


def _shards(client: MlflowClient, role: str, digest: str | None, run_id: str | None, artifact: str) -> Link:
    """A shard set named by its content digest, checked against the manifest its run logged."""
    if not digest:
        return Link("shards", role, "", False, "no digest recorded")
    manifest = _manifest(client, run_id, artifact) if run_id else None
    if manifest is None:
        return Link("shards", role, digest, False, f"{artifact} not found in run {run_id}")
    logged = manifest.get("content_digest")
    if logged != digest:
        return Link("shards", role, digest, False, f"the logged manifest has digest {logged}")
    decoder = manifest.get("decoder") or {}
    decoded = ", ".join(f"{k} {v}" for k, v in decoder.items() if isinstance(v, str))
    detail = f"{manifest.get('rows')} rows from {manifest.get('source_root')}" + (f"; {decoded}" if decoded else "")
    return Link("shards", role, digest, True, detail)


def trace(uri: str, client: MlflowClient | None = None, depth: int = 0) -> Link:
    """The lineage tree of a registered model version (teachers traced one level down)."""
    client = client or MlflowClient()
    v = resolve_version(client, uri)
    tags = {k[len(PREFIX) :]: val for k, val in v.tags.items() if k.startswith(PREFIX)}
    if not tags:
        raise LineageError(f"{uri} (version {v.version}) has no lineage tags: it was not registered by mdlda's chain")
    root = Link("model", "model", f"models:/{v.name}/{v.version}", True, f"trained in run {v.run_id}")
    root.children.append(_run(client, "trained in", v.run_id))
    root.children.append(_run(client, "chain", tags.get("chain_run")))
    logged = tags.get("manifests_run")
    for name in SHARD_SETS:
        if f"shards.{name}" in tags or name != "pseudolabels":
            digest = tags.get(f"shards.{name}")
            root.children.append(_shards(client, f"shards:{name}", digest, logged, manifest_artifact(name)))
    if "sweep_run" in tags:
        sweep = _run(client, "sweep", tags["sweep_run"])
        if tags.get("sweep"):
            sweep.detail += f"; sweep {tags['sweep']}"
        root.children.append(sweep)
    if "pseudolabel_run" in tags:
        root.children.append(_run(client, "pseudolabel", tags["pseudolabel_run"]))
    for i, teacher in enumerate(t for t in tags.get("teachers", "").split(",") if t):
        if depth > 0:
            root.children.append(Link("model", f"teacher-{i + 1}", teacher, True))
            continue
        try:
            root.children.append(_relabel(trace(teacher, client, depth + 1), f"teacher-{i + 1}"))
        except LineageError as exc:
            root.children.append(Link("model", f"teacher-{i + 1}", teacher, False, str(exc)))
    return root


def _relabel(link: Link, role: str) -> Link:
    link.role = role
    return link


def render(link: Link):
    """A rich Tree of the lineage (broken links in red)."""
    from rich.tree import Tree

    def label(node: Link) -> str:
        mark = "[green]ok[/]" if node.ok else "[bold red]BROKEN[/]"
        detail = f" [dim]{node.detail}[/]" if node.detail else ""
        return f"{mark} [bold]{node.role}[/] {node.kind} {node.ref}{detail}"

    def add(tree, node: Link) -> None:
        for child in node.children:
            add(tree.add(label(child)), child)

    tree = Tree(label(link))
    add(tree, link)
    return tree
