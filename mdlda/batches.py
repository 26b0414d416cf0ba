"""What a training step reads: a batch dict checked for its mode and moved to the device as tensors.

Batches carry audio as ``(B, N)`` float or int16 PCM and ratings on the 1..10 scale; :func:`prepare_batch` checks
shapes and values and divides the ratings by :data:`mdlda.params.LABEL_SCALE`, so every loss in
:mod:`mdlda.steps` is on the model's 0..1 output scale.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mdlda.params import LABEL_SCALE, NUM_FEATURES

MODES = ("supervised", "dann", "distill")
_REQUIRED_KEYS = {
    "supervised": ("audio", "labels"),
    "dann": ("audio", "labels", "target_audio"),
    "distill": (),  # a source pair ("audio", "labels"), a target pair ("target_audio", "target_labels"), or both
}
DOMAIN_PAIRS = (("audio", "labels"), ("target_audio", "target_labels"))


def _to(t: Tensor, device: torch.device, pin: bool) -> Tensor:
    """Host -> device copy; to CUDA with ``pin`` from page-locked memory, so ``non_blocking`` really is
    asynchronous (from pageable memory the driver copies synchronously). On a CPU device: nothing to copy."""
    if pin and device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _audio(x: Any, device: torch.device, name: str, pin: bool = False) -> Tensor:
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        # a view of the shards' PCM bytes (mdlda/pcm.py); the model never writes to its input
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.as_tensor(x)
    else:
        t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"batch[{name!r}] must be (B, N) audio; got shape {tuple(t.shape)}")
    if t.dtype == torch.float64:
        t = t.float()
    elif not (t.dtype == torch.int16 or t.is_floating_point()):
        raise ValueError(f"batch[{name!r}] must be float or int16 PCM; got {t.dtype}")
    return _to(t, device, pin)


def _labels(x: Any, device: torch.device, name: str, batch_size: int) -> Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, Tensor) else x).float()
    if t.shape != (batch_size, NUM_FEATURES):
        raise ValueError(f"batch[{name!r}] must be ({batch_size}, {NUM_FEATURES}) ratings; got shape {tuple(t.shape)}")
    bad = ~torch.isfinite(t)
    if bad.any():
        rows = torch.nonzero(bad.any(dim=1)).flatten().tolist()
        raise ValueError(
            f"batch[{name!r}] has NaN/inf labels in rows {rows[:10]}{' ...' if len(rows) > 10 else ''}: "
            "unlabelled segments must not reach a supervised loss (filter them out of the labelled set)"
        )
    return (t / LABEL_SCALE).to(device, non_blocking=True)


def _weights(x: Any, device: torch.device, batch_size: int) -> Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, Tensor) else x).float()
    if t.shape != (batch_size,):
        raise ValueError(f"batch['target_weights'] must be ({batch_size},) weights; got shape {tuple(t.shape)}")
    if not (torch.isfinite(t).all() and (t >= 0).all()):
        raise ValueError("batch['target_weights'] must be finite and >= 0")
    return t.to(device, non_blocking=True)


def prepare_batch(
    batch: Mapping[str, Any], mode: str, device: torch.device | str, pin_memory: bool = False
) -> dict[str, Tensor]:
    """Check a batch dict for ``mode`` and move it to ``device`` as tensors.

    Audio (``"audio"``, ``"target_audio"``): ``(B, N)`` float in [-1, 1] or int16 PCM, tensor or numpy; kept
    in its dtype (float64 -> float32) for the model's front end. Labels (``"labels"``, ``"target_labels"``):
    ``(B, 7)`` on the 1..10 scale -> float32 on the 0..1 scale. NaN/inf labels raise ``ValueError``. A
    "distill" batch may hold one domain only (the student's pooled mix) or both (the paired mix), and optionally
    ``"target_weights"`` ``(B_t,)``: a weight >= 0 per pseudo-labelled segment
    (see :func:`mdlda.distill_step.distill_loss`).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    missing = [k for k in _REQUIRED_KEYS[mode] if k not in batch]
    if missing:
        raise KeyError(f"a {mode!r} batch needs keys {_REQUIRED_KEYS[mode]}; missing {missing}")
    device = torch.device(device)
    if mode == "distill":
        out: dict[str, Tensor] = {}
        for audio_key, label_key in DOMAIN_PAIRS:
            if (audio_key in batch) != (label_key in batch):
                raise KeyError(f"a 'distill' batch holds {audio_key!r} and {label_key!r} together or neither")
            if audio_key in batch:
                out[audio_key] = _audio(batch[audio_key], device, audio_key, pin_memory)
                out[label_key] = _labels(batch[label_key], device, label_key, out[audio_key].shape[0])
        if "target_weights" in batch:
            if "target_audio" not in out:
                raise KeyError("a 'distill' batch with 'target_weights' needs 'target_audio' and 'target_labels'")
            out["target_weights"] = _weights(batch["target_weights"], device, out["target_audio"].shape[0])
        if not out:
            raise KeyError("a 'distill' batch needs ('audio', 'labels'), ('target_audio', 'target_labels') or both")
        return out
    out = {"audio": _audio(batch["audio"], device, "audio", pin_memory)}
    out["labels"] = _labels(batch["labels"], device, "labels", out["audio"].shape[0])
    if mode == "dann":
        out["target_audio"] = _audio(batch["target_audio"], device, "target_audio", pin_memory)
    return out


def batch_size(batch: Mapping[str, Tensor]) -> int:
    """Segments in a prepared batch that go through the model (source + target)."""
    return sum(batch[k].shape[0] for k in ("audio", "target_audio") if k in batch)


def pseudo_labels(batch: dict, labels: str) -> dict:
    """``labels="raw"``: the pseudo-labelled segments learn the teachers' mean before their output calibration."""
    raw = batch.pop("target_labels_raw", None)
    if labels == "raw" and "target_audio" in batch:
        if raw is None:
            raise ValueError("student labels 'raw' need the pseudo-label shards' labels_raw column: rerun pseudolabel")
        batch["target_labels"] = raw
    return batch


def spread_weighted(batch: dict, weighting: str) -> dict:
    """``weighting="spread"``: each pseudo-labelled segment weighs exp(-s^2), s its teacher spread (1..10 scale)."""
    spread = batch.pop("target_spread", None)
    if weighting == "spread":
        if spread is None and "target_audio" in batch:
            raise ValueError("weighting 'spread' needs the pseudo-label shards' teacher_spread column")
        if spread is not None:
            batch["target_weights"] = np.exp(-np.square(spread, dtype=np.float32))
    return batch
