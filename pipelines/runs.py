"""The MLflow bookkeeping every stage shares: the chain's parent run, one nested run per stage, JSON artifacts,
the lineage tags of the shards a stage read, and the registry lookups of a sweep's versions.

A stage's run is found again by its name under the same parent on a rerun, so a resumed chain adds to the runs
it made before instead of starting new ones.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from mdlda.config import ChainConfig

STAGE_TAG = "mdlda.stage"
CHAIN_TAG = "mdlda.chain"


@dataclass(frozen=True)
class StageContext:
    """Where a chain's stages work and record: its workdir, its MLflow experiment and store, its parent run and
    its config digest (``key``)."""

    workdir: Path
    experiment: str
    exp_id: str
    uri: str
    parent: str
    key: str

    def shards(self, name: str) -> Path:
        return self.workdir / "shards" / name


def parent_run(exp_id: str, key: str, cfg: ChainConfig) -> str:
    """The chain's parent run: reused when this config ran before, created otherwise."""
    client = MlflowClient()
    runs = client.search_runs([exp_id], f"tags.`{CHAIN_TAG}` = '{key}'", max_results=1)
    if runs:
        return runs[0].info.run_id
    run = client.create_run(exp_id, run_name=f"chain-{key[:8]}", tags={CHAIN_TAG: key})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "chain_config.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        client.log_artifact(run.info.run_id, str(path))
    return run.info.run_id


def find_stage_run(exp_id: str, parent_id: str, name: str) -> str | None:
    """The id of stage ``name``'s run under the parent run ``parent_id``, if it has one."""
    runs = MlflowClient().search_runs(
        [exp_id],
        f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{STAGE_TAG}` = '{name}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


@contextmanager
def stage(ctx: StageContext, name: str):
    """A nested run for one stage (reused on reruns); yields the active run."""
    run_id = find_stage_run(ctx.exp_id, ctx.parent, name)
    with mlflow.start_run(run_id=ctx.parent, experiment_id=ctx.exp_id):
        with mlflow.start_run(
            run_id=run_id,
            run_name=None if run_id else name,
            nested=True,
            experiment_id=ctx.exp_id,
            tags={STAGE_TAG: name},
        ) as run:
            yield run


def finish_parent(parent_id: str, student_uri: str) -> None:
    client = MlflowClient()
    client.set_tag(parent_id, "mdlda.student", student_uri)
    client.set_terminated(parent_id, "FINISHED")


def log_json(obj, name: str) -> None:
    """``obj`` as the JSON artifact ``name`` of the active run."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_text(json.dumps(obj, indent=2, default=str))
        mlflow.log_artifact(str(path))


def log_manifests_read(run, manifests: dict[str, dict]) -> dict[str, str]:
    """Log the full manifests of the shard sets a stage read (``name`` -> manifest) with its run; return the
    lineage tags naming them (see mdlda/lineage.py)."""
    from mdlda.lineage import manifest_artifact

    for name, manifest in manifests.items():
        log_json(manifest, manifest_artifact(name))
    parent = MlflowClient().get_run(run.info.run_id).data.tags.get("mlflow.parentRunId", "")
    return {
        "lineage.chain_run": parent,
        "lineage.manifests_run": run.info.run_id,
        **{f"lineage.shards.{name}": m["content_digest"] for name, m in manifests.items()},
    }


def registered_for_sweep(registered_model: str, sweep_id: str) -> list[dict]:
    """Versions of ``registered_model`` tagged with ``sweep_id``, by rank."""
    try:
        versions = MlflowClient().search_model_versions(f"name='{registered_model}'")
    except Exception:
        return []
    found = [
        {**v.tags, "version": str(v.version), "run_id": v.run_id, "uri": f"models:/{registered_model}/{v.version}"}
        for v in versions
        if v.tags.get("sweep_id") == sweep_id
    ]
    return sorted(found, key=lambda t: int(t.get("rank", 0)))
