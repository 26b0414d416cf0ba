"""How far a window's embedding lies from the training data: the out-of-distribution (OOD) signal of a served model.

The served model returns raw, unclipped ratings (docs/serving.md, "The scale"), and an in-range answer is no
proof that the input is music. So every model the chain registers carries statistics of its own 512-d embedding
phi (``forward_features``) over the source training split, and :func:`OodStats.score` gives each window a
distance from them:

    score(e) = sqrt( mean_d (e_d - mu_d)^2 / v_d ),   v_d = (1 - SHRINK) var_d + SHRINK * mean_k var_k

the root-mean-square standardised deviation over the D embedding dimensions: a diagonal Mahalanobis distance
divided by sqrt(D), so a typical training window scores about 1 whatever D is. Why this form:

- a full covariance needs many more segments than dimensions (D = 512; the demo has 160 training clips), a
  diagonal one only a mean and a variance per dimension;
- some dimensions hardly vary on the training data (ReLU units that are almost never active): dividing by their
  near-zero variance would make every slight change in them look enormous. Shrinking each variance towards the
  mean variance (``SHRINK`` = 0.1) floors the divisor at a tenth of a typical dimension's variance.

The threshold is the ``QUANTILE`` (0.99) quantile of the training segments' own scores: about 1% of training
windows score above it by construction, and audio unlike the training data (white noise, silence, a sine) far
above it. Held-out music scores somewhat higher than the training segments themselves (the model has fitted
those), so its flagged share is above 1%: docs/serving.md gives measured numbers.

The statistics are a plain JSON file (:data:`OOD_FILE`) in the model's weights-only checkpoint folder
(:func:`save` / :func:`load`): numbers only, nothing that can run code. Pure library code: no Ray, nothing on
import.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OOD_FILE = "ood.json"
QUANTILE = 0.99
SHRINK = 0.1
MIN_SEGMENTS = 2  # a variance needs two points


@dataclass(frozen=True)
class OodStats:
    """Embedding statistics of a model's training data: per-dimension ``mean`` and shrunk variance ``var`` (D,),
    and the ``threshold`` score above which a window is flagged (the ``quantile`` of the ``n`` training
    segments' own scores; ``source`` says which data they were)."""

    mean: np.ndarray
    var: np.ndarray
    threshold: float
    quantile: float
    n: int
    source: str = ""

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """(W,) distances of (W, D) embeddings from the training data (see the module docstring)."""
        e = np.asarray(embeddings, dtype=np.float64)
        if e.ndim != 2 or e.shape[1] != len(self.mean):
            raise ValueError(f"expected embeddings of shape (W, {len(self.mean)}), got {e.shape}")
        return np.sqrt((((e - self.mean) ** 2) / self.var).mean(axis=1))

    def flag(self, scores: np.ndarray) -> np.ndarray:
        """(W,) True where a score is above the threshold: the window looks unlike the training data."""
        return np.asarray(scores) > self.threshold

    def to_dict(self) -> dict:
        return {
            "method": "rms standardised distance, diagonal variance shrunk to the mean variance (mdlda.ood)",
            "shrink": SHRINK,
            "threshold": float(self.threshold),
            "quantile": float(self.quantile),
            "n": int(self.n),
            "source": self.source,
            "mean": [float(v) for v in self.mean],
            "var": [float(v) for v in self.var],
        }

    @classmethod
    def from_dict(cls, d: dict) -> OodStats:
        mean = np.asarray(d["mean"], dtype=np.float64)
        var = np.asarray(d["var"], dtype=np.float64)
        if mean.ndim != 1 or mean.shape != var.shape or not (np.isfinite(var).all() and (var > 0).all()):
            raise ValueError("OOD statistics need equal-length 'mean' and positive 'var' lists")
        return cls(mean, var, float(d["threshold"]), float(d["quantile"]), int(d["n"]), str(d.get("source", "")))


def fit(embeddings: np.ndarray, quantile: float = QUANTILE, shrink: float = SHRINK, source: str = "") -> OodStats:
    """Statistics of (N, D) training embeddings and the threshold at ``quantile`` of their own scores."""
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or len(e) < MIN_SEGMENTS:
        raise ValueError(f"need at least {MIN_SEGMENTS} embeddings of shape (N, D), got {e.shape}")
    if not 0 < quantile < 1 or not 0 <= shrink <= 1:
        raise ValueError(f"quantile must be in (0, 1) and shrink in [0, 1], got {quantile} and {shrink}")
    var = e.var(axis=0, ddof=1)
    var = (1 - shrink) * var + shrink * var.mean()
    var = np.maximum(var, 1e-12)  # an embedding constant over all training data (a dead model)
    stats = OodStats(e.mean(axis=0), var, 0.0, quantile, len(e), source)
    threshold = float(np.quantile(stats.score(e), quantile))
    return OodStats(stats.mean, var, threshold, quantile, len(e), source)


def embed(model, batches: Iterable) -> np.ndarray:
    """(N, D) ``model.forward_features`` of every (B, 330750) float32 audio batch (tensors or arrays), eval mode,
    no gradients."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for x in batches:
            x = torch.as_tensor(x, dtype=torch.float32)
            out.append(model.forward_features(x).float().cpu().numpy())  # (B, D)
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def save(stats: OodStats, directory: str | Path) -> Path:
    """Write ``directory``/:data:`OOD_FILE`; returns its path."""
    path = Path(directory) / OOD_FILE
    path.write_text(json.dumps(stats.to_dict()) + "\n")
    return path


def load(directory: str | Path) -> OodStats | None:
    """The statistics in ``directory``/:data:`OOD_FILE`, or None when the model was registered without them."""
    path = Path(directory) / OOD_FILE
    if not path.is_file():
        return None
    try:
        return OodStats.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a valid OOD statistics file ({exc})") from exc


def warning_text(flagged: int, total: int, largest: float, threshold: float) -> str | None:
    """The one-line warning when ``flagged`` of ``total`` windows score above ``threshold`` (None when none do)."""
    if flagged == 0:
        return None
    return (
        f"{flagged} of {total} windows look unlike the training data (distance up to {largest:.2f} > threshold "
        f"{threshold:.2f}): their ratings are not reliable"
    )


def warning(scores: np.ndarray, stats: OodStats) -> str | None:
    """:func:`warning_text` for a set of window scores."""
    scores = np.asarray(scores)
    if not len(scores):
        return None
    return warning_text(int(stats.flag(scores).sum()), len(scores), float(scores.max()), stats.threshold)
