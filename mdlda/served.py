"""Loading logged and registered models without running any code stored with them.

``mlflow.pytorch.load_model`` rebuilds whatever a version's files describe: a pickled module (or one with a
``code/`` folder) runs arbitrary Python on the machine that loads it, and on every Ray worker that pseudo-labels.
Anyone who can register a version and move ``@champion`` could do that. So mdlda never loads a model that way.

Every model :func:`mdlda.tracking.log_model` logs has a ``<name>-checkpoint`` artifact in its run: ``model.pt``
(the state dict) + ``config.json``. :func:`resolve` finds that checkpoint for ``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``models:/<logged model id>`` or ``runs:/RUN_ID/PATH`` (reading only the version's
record and its ``MLmodel`` YAML, with ``yaml.safe_load``), and :func:`load_checkpoint` rebuilds the network with
mdlda's own model code and ``torch.load(weights_only=True)``. A version without such a checkpoint, or whose
``model.pt`` holds more than tensors, is refused with a :class:`~mdlda.tracking.TrackingError` that says why.
The checkpoint folder may also hold ``ood.json``, the embedding statistics of :mod:`mdlda.ood` (plain JSON):
:func:`load_served_with_ood` returns them beside the model, None for a model registered before they existed.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass

from torch import nn

from mdlda.checkpoints import CONFIG_FILE, MODEL_FILE
from mdlda.ood import OodStats
from mdlda.tracking import RatingModel, TrackingError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # an artifact folder name, no path separators


@dataclass(frozen=True)
class ModelRef:
    """Where the weights-only checkpoint of a model URI lives: the run and the artifact folder inside it."""

    uri: str
    run_id: str
    checkpoint: str
    version: str | None = None  # the resolved registry version (``NAME/VERSION``), if the URI named one


def _refuse(ref_text: str, why: str) -> TrackingError:
    return TrackingError(
        f"refusing to load {ref_text}: {why}. mdlda loads models only from the weights-only checkpoint "
        f"({MODEL_FILE} + {CONFIG_FILE}) that mdlda.tracking.log_model logs beside every model, because loading "
        "a pickled or code-carrying MLflow model can run arbitrary code. Re-log the model with "
        "mdlda.tracking.log_model (the chain's stages do), or pick another version"
    )


def parse_model_uri(uri: str):
    """MLflow's own reading of a ``models:/`` URI: a ParsedModelUri with ``model_id`` (``models:/<logged model
    id>``), or ``name`` with ``version`` or ``alias`` (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``).

    A stage or ``latest`` (``models:/NAME/Production``) is refused: mdlda names a version or an alias, so a run
    records which model it used. MLflow exports the parser only under a private name; this is its one caller.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import _parse_model_uri

    expected = "expected models:/NAME@ALIAS or models:/NAME/VERSION (a number)"
    try:
        parsed = _parse_model_uri(uri.strip())
    except MlflowException as exc:
        raise ValueError(f"{uri!r}: {expected}") from exc
    if parsed.model_id is None and not (parsed.version or parsed.alias):
        raise ValueError(f"{uri!r}: {expected}")
    return parsed


def registry_version(client, parsed):
    """The ModelVersion behind a parsed ``NAME@ALIAS`` or ``NAME/VERSION`` (an ``MlflowException`` when the
    registry holds none)."""
    if parsed.alias:
        return client.get_model_version_by_alias(parsed.name, parsed.alias)
    return client.get_model_version(parsed.name, parsed.version)


def _registry_version(client, uri: str, parsed):
    """:func:`registry_version`, its error as a :class:`TrackingError` naming ``uri``."""
    from mlflow.exceptions import MlflowException

    try:
        return registry_version(client, parsed)
    except MlflowException as exc:
        raise TrackingError(f"cannot load model {uri!r}: {exc.message}") from exc


def _checkpoint_name(info_uri: str, default: str) -> str:
    """The checkpoint folder the model's MLmodel names (metadata ``checkpoint_artifact``), else ``default``."""
    from mlflow.models import Model

    try:
        metadata = Model.load(info_uri).metadata or {}  # downloads the MLmodel file only; yaml.safe_load
    except Exception:  # no MLmodel there (a version registered from a bare folder): the run may still have one
        return default
    name = str(metadata.get("checkpoint_artifact") or default)
    return name if _SAFE_NAME.match(name) and name not in (".", "..") else default


def resolve(uri: str) -> ModelRef:
    """The run and checkpoint folder behind ``uri``; refuses a model that carries no weights-only checkpoint."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    version = None
    if uri.startswith("models:/"):
        try:
            parsed = parse_model_uri(uri)
        except ValueError as exc:
            raise TrackingError(f"cannot load {exc}") from exc
        if parsed.model_id is not None:  # a logged model id (what MLflow 3 records as a version's source)
            try:
                run_id = client.get_logged_model(parsed.model_id).source_run_id
            except MlflowException as exc:
                raise TrackingError(f"cannot load model {uri!r}: {exc.message}") from exc
            info_uri, default = uri, "model-checkpoint"
            label = uri
        else:
            v = _registry_version(client, uri, parsed)
            version = f"{v.name}/{v.version}"
            run_id = v.run_id
            info_uri, default = f"models:/{version}", "model-checkpoint"
            label = f"{uri} (version {version})"
    elif uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/") :].partition("/")
        path = path.strip("/") or "model"
        info_uri, default = uri, f"{path.rsplit('/', 1)[-1]}-checkpoint"
        label = uri
    else:
        raise TrackingError(
            f"cannot load {uri!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH"
        )
    if not run_id:
        raise _refuse(label, "it was not logged from an MLflow run, so it has no checkpoint")
    checkpoint = _checkpoint_name(info_uri, default)
    try:
        files = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, checkpoint)}
    except MlflowException as exc:
        raise TrackingError(f"cannot list the artifacts of run {run_id} for {uri!r}: {exc.message}") from exc
    missing = [f for f in (MODEL_FILE, CONFIG_FILE) if f not in files]
    if missing:
        raise _refuse(label, f"its run {run_id} has no {checkpoint}/{' or '.join(missing)}")
    return ModelRef(uri=uri, run_id=run_id, checkpoint=checkpoint, version=version)


def _load(uri: str) -> tuple[nn.Module, OodStats | None]:
    """The full model (eval mode, CPU) and its OOD statistics (None if it has none), from one download of the
    weights-only checkpoint folder."""
    import pickle

    import mlflow

    from mdlda import ood
    from mdlda.checkpoints import load_model

    ref = resolve(uri)
    with tempfile.TemporaryDirectory(prefix="mdlda-ckpt-") as tmp:  # nothing left behind
        local = mlflow.artifacts.download_artifacts(run_id=ref.run_id, artifact_path=ref.checkpoint, dst_path=tmp)
        try:
            model = load_model(local).eval()
        except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) met a non-tensor object
            raise _refuse(uri, f"its {ref.checkpoint}/{MODEL_FILE} is not a plain weights file ({exc})") from exc
        except (ValueError, TypeError, KeyError, RuntimeError) as exc:  # unknown model name, bad config, shapes
            raise TrackingError(
                f"cannot rebuild {uri!r} from its checkpoint {ref.run_id}/{ref.checkpoint}: {exc}"
            ) from exc
        try:
            stats = ood.load(local)  # JSON numbers only
        except ValueError as exc:
            raise TrackingError(f"cannot read the OOD statistics of {uri!r}: {exc}") from exc
    if stats is not None and len(stats.mean) != getattr(model, "embed_dim", len(stats.mean)):
        raise TrackingError(
            f"the OOD statistics of {uri!r} are for a {len(stats.mean)}-d embedding, the model's is {model.embed_dim}-d"
        )
    return model, stats


def load_checkpoint(uri: str) -> nn.Module:
    """The full model (with ``forward_features``, eval mode, CPU) behind ``uri``, from its weights-only
    checkpoint; refuses a model without one or whose weights file holds anything but tensors."""
    return _load(uri)[0]


def load_served_with_ood(uri: str) -> tuple[RatingModel, OodStats | None]:
    """The served form of ``uri`` and the statistics of its embedding on its training data (``ood.json`` in the
    checkpoint, :mod:`mdlda.ood`); None for a model registered without them, which still predicts."""
    model, stats = _load(uri)
    return RatingModel(model).eval(), stats


def load_served(uri: str) -> nn.Module:
    """The served form of ``uri`` (audio (B, N) float32 -> 7 features on 1..10), weights-only (see module)."""
    return RatingModel(load_checkpoint(uri)).eval()
