"""Checkpoints as plain files: a model is a folder with ``model.pt`` (its ``state_dict``) + ``config.json``.

Everything here loads with ``torch.load(..., weights_only=True)``: the files hold only tensors, dicts, lists,
tuples, numbers, strings and None — never pickled objects — so a checkpoint from the registry cannot run code.

- :func:`save_model` / :func:`load_model`: the weights and the model config side by side. ``load_model``
  rebuilds the network with ``create_model(**config)`` (the front-end parameters are part of the config) and
  refuses a checkpoint whose config differs from the one the caller expects, naming the differing keys.
- :func:`save_training_state` / :func:`load_training_state`: the resumable state of :func:`mdlda.training.fit`
  (weights, optimiser, scheduler, counters, history, RNG states as tensors) in ``training_state.pt``.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
EXTRA_FILE = "extra.json"
STATE_FILE = "training_state.pt"


class CheckpointMismatch(ValueError):
    """A checkpoint was made with another model or front-end config than the caller expects."""


def to_cpu(obj: Any) -> Any:
    """Deep copy of nested dicts / lists / tuples with every tensor detached, cloned and moved to the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):  # keeps the dict's type (OrderedDict state dicts, the scheduler's Counter)
        out = obj.copy()
        for k, v in out.items():
            out[k] = to_cpu(v)
        return out
    if isinstance(obj, Mapping):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temporary file in the same folder and rename, so a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_normal(d: Mapping[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON so tuples vs lists and int vs float keys compare as they are stored."""
    return json.loads(json.dumps(d))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """``"key: checkpoint has X, expected Y"`` for every key of ``expected`` (nested keys dotted, e.g.
    ``frontend.hop_size``) whose value differs in ``saved``. Keys only in ``saved`` are not compared."""
    s, e = _flatten(_json_normal(saved)), _flatten(_json_normal(expected))
    missing = object()
    diffs = []
    for key, want in e.items():
        got = s.get(key, missing)
        if got is missing:
            diffs.append(f"{key}: missing in the checkpoint, expected {want!r}")
        elif got != want:
            diffs.append(f"{key}: checkpoint has {got!r}, expected {want!r}")
    return diffs


def save_model(model: nn.Module, directory: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.pt`` (``state_dict``, CPU tensors) and ``config.json`` (``model.config.to_dict()``) into
    ``directory``, plus ``extra.json`` when ``extra`` (JSON-serialisable: metrics, manifests...) is given.
    Returns the directory."""
    directory = Path(directory)
    config = model.config.to_dict()
    config_text = json.dumps(config, indent=2, sort_keys=False)
    extra_text = json.dumps(dict(extra), indent=2) if extra is not None else None  # fail before writing anything
    state = to_cpu(model.state_dict())
    _atomic_write(directory / MODEL_FILE, lambda p: torch.save(state, p))
    _atomic_write(directory / CONFIG_FILE, lambda p: Path(p).write_text(config_text + "\n"))
    if extra_text is not None:
        _atomic_write(directory / EXTRA_FILE, lambda p: Path(p).write_text(extra_text + "\n"))
    return directory


def read_model_config(directory: str | Path) -> dict[str, Any]:
    """The model config stored in a checkpoint folder."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a model checkpoint folder (need {MODEL_FILE} + {CONFIG_FILE})")
    return json.loads(path.read_text())


def read_extra(directory: str | Path) -> dict[str, Any]:
    """The ``extra`` dict saved with :func:`save_model` ({} if none)."""
    path = Path(directory) / EXTRA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_model(
    directory: str | Path,
    expect_config: Mapping[str, Any] | None = None,
    *,
    map_location: str | torch.device = "cpu",
    factory: Callable[..., nn.Module] | None = None,
) -> nn.Module:
    """Rebuild and load the model saved in ``directory`` (in eval mode).

    ``expect_config``: a (partial) model config — e.g. ``{"frontend": {...}}`` or another model's
    ``config.to_dict()`` — that the checkpoint must match; any differing key raises
    :class:`CheckpointMismatch` naming it. ``factory`` (default :func:`mdlda.models.create_model`) is called
    as ``factory(**config)``.
    """
    directory = Path(directory)
    config = read_model_config(directory)
    if expect_config is not None:
        diffs = config_differences(config, expect_config)
        if diffs:
            raise CheckpointMismatch(
                f"the checkpoint in {directory} was made with another model config than expected: " + "; ".join(diffs)
            )
    if factory is None:
        from mdlda.models import create_model as factory
    state = torch.load(directory / MODEL_FILE, map_location=map_location, weights_only=True)
    if "head" not in config and any(k.startswith("head.bn.") for k in state):
        config = {**config, "head": "bn"}  # saved before the head became an option: the BatchNorm head
    model = factory(**config)
    model.load_state_dict(state)
    return model.eval()


# -- resumable training state ------------------------------------------------------------------------------
def save_training_state(state: Mapping[str, Any], directory: str | Path) -> Path:
    """Write a :func:`mdlda.training.fit` state (``EpochResult.state()``) to ``directory/training_state.pt``.

    Returns the file's path."""
    path = Path(directory) / STATE_FILE
    _atomic_write(path, lambda p: torch.save(dict(state), p))
    return path


def load_training_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read ``directory/training_state.pt`` with ``weights_only=True``; pass it to ``fit(..., state=...)``."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no training state at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global RNG and Python's ``random``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state(device: torch.device | str = "cpu") -> dict[str, Any]:
    """torch (CPU, and CUDA when ``device`` is CUDA), numpy-global and ``random`` states, as tensors."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.device(device).type == "cuda":
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only when CUDA is available)."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
