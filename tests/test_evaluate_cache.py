"""The evaluation cache is keyed by what a model URI resolves to, on a real SQLite MLflow store (no Ray)."""

from __future__ import annotations

import pytest


@pytest.fixture()
def store(monkeypatch, tmp_path, seed_store):
    import mlflow

    from mdlda.tracking import setup_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    setup_tracking(seed_store(tmp_path / "wd").parent, "cache")
    yield tmp_path / "wd"
    mlflow.set_tracking_uri(None)


def _register(name: str, tmp_path, seed: int) -> str:
    """One registry version from a weights-only checkpoint of a tiny real model; returns its version."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from mdlda.checkpoints import save_model
    from mdlda.models import create_model

    torch.manual_seed(seed)
    d = tmp_path / f"ckpt{seed}"
    save_model(create_model("rfresnet", width=2), d)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(d), artifact_path="model-checkpoint")
    client = MlflowClient()
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    v = client.create_model_version(name, f"{run.info.artifact_uri}/model-checkpoint", run.info.run_id)
    return v.version


def _shards(tmp_path, digest_of: str):
    from mdlda.manifest import build_manifest, write_manifest

    folder = tmp_path / f"shards-{digest_of}"
    folder.mkdir()
    m = build_manifest(
        dataset="midlevel",
        source_root="x",
        counts={},
        skipped=[],
        row_digests={"clip": digest_of},
        index_digest="i",
        options={},
        decoder={},
    )
    write_manifest(folder, m)
    return str(folder)


def test_the_key_follows_the_alias_to_its_version_not_the_uri_text(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.evaluate import evaluation_key, pin_models

    v1, v2 = _register("mdlda-student", tmp_path, 1), _register("mdlda-student", tmp_path, 2)
    client = MlflowClient()
    models = {"student": "models:/mdlda-student@champion"}
    shards = _shards(tmp_path, "a")

    def key():
        pinned, resolved = pin_models(models)
        return pinned["student"], evaluation_key(resolved, {}, [], shards)

    client.set_registered_model_alias("mdlda-student", "champion", v1)
    uri1, key1 = key()
    assert uri1 == f"models:/mdlda-student/{v1}" and key() == (uri1, key1)  # stable while the alias stays
    client.set_registered_model_alias("mdlda-student", "champion", v2)
    uri2, key2 = key()
    assert uri2 == f"models:/mdlda-student/{v2}" and key2 != key1  # the alias moved: a new evaluation
    client.set_registered_model_alias("mdlda-student", "champion", v1)
    assert key() == (uri1, key1)
    # the pinned URI names the same version as the alias did: same key
    _, resolved = pin_models({"student": f"models:/mdlda-student/{v1}"})
    assert evaluation_key(resolved, {}, [], shards) == key1
    # other shard content, same models: another key
    _, resolved = pin_models(models)
    assert evaluation_key(resolved, {}, [], _shards(tmp_path, "b")) != key1
