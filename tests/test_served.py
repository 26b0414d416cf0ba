"""Loading registry models weights-only, on a real SQLite MLflow store: planted code never runs, real models load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn


@pytest.fixture()
def store(monkeypatch, tmp_path, seed_store):
    """A fresh embedded store in tmp_path/wd (the workdir, returned), the active one for the test."""
    import mlflow

    from mdlda.tracking import setup_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    setup_tracking(seed_store(tmp_path / "wd").parent, "served")
    yield tmp_path / "wd"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)


class Planted(nn.Module):
    """A module whose pickle, when unpickled, writes ``marker`` (what a hostile version could do instead)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :7]

    def __reduce_ex__(self, protocol):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_planted_pickle_is_refused_and_never_runs(store, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from mdlda.tracking import TrackingError, load_checkpoint, load_served

    marker = tmp_path / "pwned"
    with mlflow.start_run() as run:
        mlflow.pytorch.log_model(
            Planted(str(marker)),
            name="model",
            serialization_format="pickle",
            pip_requirements=["torch"],  # no requirement inference: it would load (and run) the model
            registered_model_name="planted",
        )
    MlflowClient().set_registered_model_alias("planted", "champion", "1")
    assert not marker.exists()
    for uri in ("models:/planted@champion", "models:/planted/1", f"runs:/{run.info.run_id}/model"):
        with pytest.raises(TrackingError, match="refusing to load .*no model-checkpoint.*can run arbitrary code"):
            load_served(uri)
        with pytest.raises(TrackingError, match="refusing to load"):
            load_checkpoint(uri)
    assert not marker.exists()

    # a checkpoint folder whose model.pt is that pickle: torch.load(weights_only=True) refuses it
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save(Planted(str(marker)), ckpt / "model.pt")
    (ckpt / "config.json").write_text(json.dumps({"name": "rfresnet", "width": 2}))
    with mlflow.start_run() as bad:
        mlflow.log_artifacts(str(ckpt), artifact_path="model-checkpoint")
    client = MlflowClient()
    client.create_registered_model("planted-ckpt")
    client.create_model_version("planted-ckpt", f"{bad.info.artifact_uri}/model-checkpoint", bad.info.run_id)
    with pytest.raises(TrackingError, match="model-checkpoint/model.pt is not a plain weights file"):
        load_served("models:/planted-ckpt/1")
    assert not marker.exists()

    with pytest.raises(Exception):  # noqa: B017 - the plant is live: MLflow's own loader runs it
        mlflow.pytorch.load_model("models:/planted/1")(torch.zeros(1, 8))
    assert marker.read_text() == "ran"


def test_unknown_models_and_uris_get_a_clear_error(store):
    from mdlda.tracking import TrackingError, load_served

    with pytest.raises(TrackingError, match="'models:/nobody@champion'"):
        load_served("models:/nobody@champion")
    with pytest.raises(TrackingError, match="expected models:/NAME@ALIAS"):
        load_served("/some/folder/model")
    with pytest.raises(TrackingError, match="VERSION \\(a number\\)"):
        load_served("models:/x/Production")
    for uri in ("models:/x/latest", "models:/a/b/3", "models:/", "models:/x@"):
        with pytest.raises(TrackingError, match="expected models:/NAME@ALIAS"):
            load_served(uri)
    with pytest.raises(TrackingError, match="'models:/nobody'.*nobody"):  # a logged model id the store lacks
        load_served("models:/nobody")


def test_model_uris_are_read_by_mlflows_parser():
    from mdlda.lineage import LineageError, resolve_version
    from mdlda.served import parse_model_uri

    assert parse_model_uri("models:/mdlda-student@champion")[1:] == ("mdlda-student", None, None, "champion")
    assert parse_model_uri(" models:/mdlda-teacher/12 ")[1:3] == ("mdlda-teacher", "12")
    assert parse_model_uri("models:/m-0123abc").model_id == "m-0123abc"
    for bad in ("models:/x/Production", "models:/x/latest", "runs:/abc/model", "models:/a/b/3"):
        with pytest.raises(ValueError, match="expected models:/NAME@ALIAS or models:/NAME/VERSION"):
            parse_model_uri(bad)
    for bad in ("models:/x/Production", "models:/m-0123abc"):  # lineage needs a registered version
        with pytest.raises(LineageError, match="expected models:/NAME@ALIAS"):
            resolve_version(None, bad)


@pytest.mark.slow
def test_a_logged_model_loads_weights_only_and_predicts_as_before(store):
    """log_model's pt2 export (~40 s on a busy 2-CPU box) and the weights-only path give the same numbers."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from mdlda.models import create_model
    from mdlda.tracking import RatingModel, load_served, log_model

    torch.manual_seed(0)
    model = create_model("rfresnet", width=2).eval()
    with mlflow.start_run() as run:
        info = log_model(model, registered_model_name="tiny")
    MlflowClient().set_registered_model_alias("tiny", "champion", "1")
    audio = torch.from_numpy(np.random.default_rng(0).uniform(-0.3, 0.3, (2, 330_750)).astype(np.float32))
    with torch.no_grad():
        before = mlflow.pytorch.load_model("models:/tiny/1")(audio).numpy()
        for uri in ("models:/tiny@champion", "models:/tiny/1", f"runs:/{run.info.run_id}/model", info.model_uri):
            served = load_served(uri)
            assert isinstance(served, RatingModel) and not served.training
            np.testing.assert_allclose(served(audio).numpy(), before, rtol=1e-4, atol=1e-4)
    assert before.shape == (2, 7) and np.ptp(before) > 0

    # the stages' callers: evaluate's predictions and the pseudo-labelling actor take the same weights-only path
    from mdlda.params import PCM_SCALE, RATING_MAX, RATING_MIN
    from mdlda.tracking import tracking_uri
    from pipelines.evaluate import predict_splits
    from pipelines.pseudolabel import TeacherEnsemble

    pcm = (audio.numpy() * PCM_SCALE).astype(np.int16)
    with torch.no_grad():
        expect = load_served("models:/tiny/1")(torch.from_numpy(pcm.astype(np.float32) / PCM_SCALE)).numpy()
    data = {"test": {"clip_id": np.array(["a", "b"]), "audio": pcm, "labels": np.ones((2, 7), np.float32)}}
    preds = predict_splits({"tiny": "models:/tiny@champion"}, shards=None, splits=("test",), data=data)
    np.testing.assert_allclose(preds.y_pred[("tiny", "test")], expect, rtol=1e-5, atol=1e-5)
    actor = TeacherEnsemble(["models:/tiny/1", "models:/tiny@champion"], tracking_uri(store))
    import pyarrow as pa

    from mdlda.pcm import to_column

    table = actor(pa.table({"clip_id": pa.array(["a", "b"]), "audio": to_column(pcm)}))  # as Ray Data hands it
    labels = np.stack(table.column("labels").to_pylist())
    np.testing.assert_allclose(labels, np.clip(expect, RATING_MIN, RATING_MAX), rtol=1e-5, atol=1e-5)
