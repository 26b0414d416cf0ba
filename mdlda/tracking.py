"""MLflow: where runs go, how models are logged, registered and found again.

Default store: ``sqlite:///<abs workdir>/mlflow.db`` with artifacts under ``<workdir>/mlartifacts`` (no server).
``MLFLOW_TRACKING_URI`` overrides it (a tracking server on a cluster). Registered models are exported with
torch.export ("pt2", no pickle) and take 22.05 kHz mono audio (B, 330750) float32, giving the 7 features on
the 1..10 scale, not clipped; their signature names the 7 output columns (:func:`output_schema`, docs/serving.md).
mdlda itself loads them only from the weights-only checkpoint logged beside each one
(:func:`load_served`, :mod:`mdlda.served`), never by running what a version's files describe.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mdlda.params import FEATURES, LABEL_SCALE, SEGMENT_SAMPLES

if TYPE_CHECKING:
    from mdlda.ood import OodStats

TEACHER_MODEL = "mdlda-teacher"
BASELINE_MODEL = "mdlda-baseline"
STUDENT_MODEL = "mdlda-student"
CHAMPION = "champion"


class TrackingError(RuntimeError):
    """The MLflow store cannot be reached or used; the message names the URI and the fix."""


def tracking_override() -> str | None:
    """``MLFLOW_TRACKING_URI`` when set and not empty: the store every command uses instead of a workdir's."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def tracking_uri(workdir: str | Path) -> str:
    """The store of ``workdir``: :func:`tracking_override` if set, else the workdir's embedded SQLite store."""
    return tracking_override() or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def use_tracking(workdir: str | Path, uri: str | None = None) -> str:
    """Point MLflow at ``uri``, else at :func:`tracking_uri` of ``workdir``; returns the URI in use."""
    import mlflow

    uri = uri or tracking_uri(workdir)
    mlflow.set_tracking_uri(uri)
    return uri


def setup_tracking(workdir: str | Path, experiment: str) -> str:
    """Point MLflow at the store, check it answers, and get or create ``experiment``; returns its id.

    Done in the driver before any trial starts: the experiment's artifact location is fixed at creation.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(workdir)
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # Ray workers started after this inherit it through the runtime env
    client = MlflowClient(uri)
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)  # an unreachable server fails in seconds, not after minutes of retries
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if uri.startswith("sqlite:"):
                location = (workdir / "mlartifacts").as_uri()
            exp_id = client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
    except Exception as exc:  # connection refused, bad URI, locked or corrupt database, no login
        raise TrackingError(
            f"MLflow tracking store {uri} is not usable ({type(exc).__name__}: {exc}). " + _tracking_fix(exc)
        ) from exc
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _tracking_fix(exc: Exception) -> str:
    """What to do about a store that failed: log in (401), get a permission (403), or start a server."""
    code = getattr(exc, "error_code", "")
    if code == "UNAUTHENTICATED" or "error code 401" in str(exc):
        return (
            "The server asks for a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or put them "
            "in ~/.mlflow/credentials (see cluster/README.md, 'The MLflow login')."
        )
    if (code == "PERMISSION_DENIED" or "error code 403" in str(exc)) and "Invalid Host header" not in str(exc):
        return (
            "The server's user has no permission for this experiment: log in as its owner, or have the MLflow admin "
            "grant one (cluster/README.md, 'The MLflow login')."
        )
    return (
        "Start the tracking server (see cluster/README.md) or unset MLFLOW_TRACKING_URI to use the embedded "
        "SQLite store."
    )


def server_command(workdir: str | Path) -> str:
    """The commands that move a workdir's embedded store behind a tracking server (same database, same files)."""
    workdir = Path(workdir).resolve()
    return (
        f"mlflow server --backend-store-uri sqlite:///{workdir / 'mlflow.db'} "
        f"--default-artifact-root {(workdir / 'mlartifacts').as_uri()} --host 127.0.0.1 --port 5000 &\n"
        "  export MLFLOW_TRACKING_URI=http://127.0.0.1:5000"
    )


def _is_locked(exc: BaseException | None) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if "database is locked" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def sqlite_guard(workdir: str | Path):
    """Turn SQLite's "database is locked" (more concurrent writers than the embedded store copes with, e.g. two
    chains on one workdir) into a TrackingError that shows how to start the tracking server instead."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as exc:
        if not (tracking_uri(workdir).startswith("sqlite:") and _is_locked(exc)):
            raise
        raise TrackingError(
            f"the embedded MLflow store {tracking_uri(workdir)} is locked by another writer, and SQLite serialises "
            "writers: run one chain per workdir, or start a tracking server on the same database and point mdlda "
            f"at it:\n  {server_command(workdir)}"
        ) from exc


class RatingModel(nn.Module):
    """The served form of a model: audio (B, N) float32 in [-1, 1] -> 7 features on the 1..10 scale."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.model(audio) * LABEL_SCALE  # (B, 7)

    def uncalibrated(self, ratings: torch.Tensor) -> torch.Tensor:
        """``ratings`` (B, 7) of this model mapped back through its output calibration (mdlda/calibration.py):
        what its head gave before the calibration, on the 1..10 scale."""
        m = self.model
        return (ratings / LABEL_SCALE - m.output_shift) / m.output_scale * LABEL_SCALE

    def rate_and_embed(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ratings (B, 7), embedding (B, D)) from one pass: what the OOD score (:mod:`mdlda.ood`) reads."""
        feats = self.model.forward_features(audio)  # (B, D)
        return self.model.forward_head(feats) * LABEL_SCALE, feats


def output_schema():
    """The served models' output schema: one float column per feature, in :data:`~mdlda.params.FEATURES` order.

    A column schema, not a (B, 7) tensor spec, so the signature says which column is which feature. MLflow's
    pytorch flavour still returns a plain (B, 7) array (``mlflow models serve`` answers ``{"predictions": [[7
    numbers], ...]}``: it never applies an output schema), so these names are the documented order of that array.
    """
    from mlflow.types import ColSpec, Schema

    return Schema([ColSpec("float", f) for f in FEATURES])


def _pip_requirements() -> list[str]:
    import mlflow

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"]


def log_model(
    model: nn.Module,
    name: str = "model",
    registered_model_name: str | None = None,
    tags: dict[str, Any] | None = None,
    ood: OodStats | None = None,
):
    """Log ``model`` (wrapped in :class:`RatingModel`, eval mode, CPU) as a pt2 export with a signature: a
    (-1, 330750) float32 tensor in, the 7 named feature columns out (:func:`output_schema`).

    The input example is a batch of 2 so the exported batch dimension stays dynamic. ``ood``: the statistics of
    the model's embedding on its training data (:mod:`mdlda.ood`), written as ``ood.json`` into the checkpoint
    folder, where ``mdlda predict`` and ``mdlda compare`` find them.
    """
    import mlflow
    from mlflow.models import ModelSignature, infer_signature

    served = RatingModel(model).eval().to("cpu")
    example = np.zeros((2, SEGMENT_SAMPLES), dtype=np.float32)
    example[1, ::50] = 0.1
    with torch.no_grad():
        out = served(torch.from_numpy(example)).numpy()
    if out.shape[1:] != (len(FEATURES),):
        raise ValueError(f"a served model gives {len(FEATURES)} features per clip, this one gives {out.shape[1:]}")
    signature = ModelSignature(inputs=infer_signature(example).inputs, outputs=output_schema())
    import tempfile

    from mdlda.checkpoints import save_model

    with tempfile.TemporaryDirectory() as d:  # the plain state dict + config too: embeddings, fine-tuning
        save_model(model, d)
        if ood is not None:
            from mdlda import ood as ood_file

            ood_file.save(ood, d)
        mlflow.log_artifacts(d, artifact_path=f"{name}-checkpoint")
    return mlflow.pytorch.log_model(
        served,
        name=name,
        input_example=example,
        signature=signature,
        # MLflow would load the saved model back and run the example through it: it only ever warns, costs
        # about as much as the logging itself, and the served model is checked for real (tests/test_serve.py)
        validate_serving_input=False,
        serialization_format="pt2",
        pip_requirements=_pip_requirements(),
        registered_model_name=registered_model_name,
        metadata={
            "features": list(FEATURES),
            "output_scale": "ratings on the 1..10 scale, not clipped (docs/serving.md)",
            "sample_rate": 22050,
            "checkpoint_artifact": f"{name}-checkpoint",
            **({"ood_stats": f"{name}-checkpoint/ood.json (docs/serving.md)"} if ood is not None else {}),
        },
        tags=tags,
    )


def load_checkpoint(uri: str) -> nn.Module:
    """The full model (with ``forward_features``) behind a registered/logged model, from its run's weights-only
    checkpoint (see :mod:`mdlda.served`)."""
    from mdlda import served

    return served.load_checkpoint(uri)


def load_served(uri: str) -> nn.Module:
    """Load a logged or registered model (``models:/NAME@alias``, ``models:/NAME/3``, ``runs:/...``) in its
    served form, from its weights-only checkpoint: never through ``mlflow.pytorch.load_model``, which can run
    code stored with the model (see :mod:`mdlda.served`)."""
    from mdlda import served

    return served.load_served(uri)


def latest_version(registered_model: str, run_id: str):
    """The registry version of ``registered_model`` that was made from ``run_id`` (newest first)."""
    from mlflow.tracking import MlflowClient

    versions = MlflowClient().search_model_versions(f"name='{registered_model}' and run_id='{run_id}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def move_champion_if_better(name: str, version: str, score: float, tag: str = "val_r_mean") -> bool:
    """Point ``name@champion`` at ``version`` when its ``score`` beats the current champion's tagged score."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.set_model_version_tag(name, version, tag, f"{score:.6f}")
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is not None:
        best = float(current.tags.get(tag, "-inf"))
        if not score > best:
            return False
    client.set_registered_model_alias(name, CHAMPION, version)
    return True
