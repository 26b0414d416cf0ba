"""Evaluation metrics: per-feature Pearson r and RMSE, domain discrepancy, domain-head accuracy.

Numpy (or anything ``np.asarray`` takes, CPU tensors included) in, plain Python floats out, so the results go
straight into MLflow, Ray Tune reports and JSON.

Conventions:

- Regression inputs are ``(N, 7)`` arrays in the order of :data:`mdlda.params.FEATURES`, **on the rating scale
  (1..10)**: RMSE is reported in rating points. (Pearson r does not depend on the scale.)
- **A constant column has r = 0.0**, not NaN. The correlation is undefined there, but a predictor that outputs
  the same value for every clip carries no information about the ranking of clips, and 0 is the score of
  "no linear skill". This keeps ``r_mean`` a number early in training (a collapsed network, a model with a
  single output value) so early stopping and Tune can still compare trials. Non-finite inputs are not hidden:
  a NaN or inf anywhere in a column makes that column's r and RMSE NaN (and so the means).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from mdlda.params import FEATURES, NUM_FEATURES, RATING_MAX, RATING_MIN


def _as_2d(x: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be (N,) or (N, F); got shape {a.shape}")
    return a


def pearson_r(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Pearson r per column of ``(N, F)`` (or ``(N,)``) arrays -> ``(F,)`` float64.

    A column where either side is constant gets 0.0 (see the module docstring); a column with a non-finite
    value gets NaN. Needs N >= 2.
    """
    t, p = _as_2d(y_true, "y_true"), _as_2d(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    if t.shape[0] < 2:
        raise ValueError(f"Pearson r needs at least 2 rows; got {t.shape[0]}")
    finite = np.isfinite(t).all(axis=0) & np.isfinite(p).all(axis=0)
    tc = t - t.mean(axis=0)
    pc = p - p.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = np.sqrt((tc * tc).sum(axis=0)) * np.sqrt((pc * pc).sum(axis=0))
        r = (tc * pc).sum(axis=0) / denom
    # "Constant" relative to the column's magnitude: round-off around a constant does not count as signal.
    tiny = np.finfo(np.float64).eps * 8
    constant = (np.ptp(t, axis=0) <= tiny * np.abs(t).max(axis=0)) | (np.ptp(p, axis=0) <= tiny * np.abs(p).max(axis=0))
    r = np.where(constant, 0.0, np.clip(r, -1.0, 1.0))
    return np.where(finite, r, np.nan)


def rmse(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Root-mean-square error per column of ``(N, F)`` (or ``(N,)``) arrays -> ``(F,)`` float64."""
    t, p = _as_2d(y_true, "y_true"), _as_2d(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    if t.shape[0] < 1:
        raise ValueError("RMSE needs at least 1 row")
    return np.sqrt(((t - p) ** 2).mean(axis=0))


def regression_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """Pearson r and RMSE per feature and their means over the 7 features.

    ``y_true``, ``y_pred``: ``(N, 7)`` on the rating scale (1..10), N >= 2. Returns
    ``{"r_melodiousness": ..., ..., "r_minorness": ..., "r_mean": ...,
    "rmse_melodiousness": ..., ..., "rmse_mean": ...}``.
    """
    t, p = _as_2d(y_true, "y_true"), _as_2d(y_pred, "y_pred")
    if t.shape[1] != NUM_FEATURES:
        raise ValueError(f"expected {NUM_FEATURES} feature columns ({', '.join(FEATURES)}); got {t.shape[1]}")
    r, e = pearson_r(t, p), rmse(t, p)
    out = {f"r_{name}": float(v) for name, v in zip(FEATURES, r, strict=True)}
    out["r_mean"] = float(r.mean())
    out.update({f"rmse_{name}": float(v) for name, v in zip(FEATURES, e, strict=True)})
    out["rmse_mean"] = float(e.mean())
    return out


def level_offsets(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """How far the predictions sit above (+) or below (-) the labels on the rating scale, per feature: mean
    prediction minus mean label (``offset_<feature>``), and the mean absolute offset over the features
    (``offset_mean``).

    The part of the RMSE that is level, not ranking: per feature, RMSE^2 = offset^2 + the error about the means, so
    a model whose piano outputs are shifted by the domain can have a good r and an RMSE above predicting the mean;
    Pearson r cannot see this.
    """
    t, p = _as_2d(y_true, "y_true"), _as_2d(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    if t.shape[0] < 1 or t.shape[1] != NUM_FEATURES:
        raise ValueError(f"expected (N >= 1, {NUM_FEATURES}) arrays; got {t.shape}")
    d = p.mean(axis=0) - t.mean(axis=0)
    out = {f"offset_{name}": float(v) for name, v in zip(FEATURES, d, strict=True)}
    out["offset_mean"] = float(np.abs(d).mean())
    return out


def in_scale(y_pred: ArrayLike) -> float:
    """Share of the outputs inside the rating scale (1..10)."""
    p = np.asarray(y_pred, dtype=np.float64)
    return float(((p >= RATING_MIN) & (p <= RATING_MAX)).mean())


def rating_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """What a results table reports of a model on a test split: :func:`regression_metrics`,
    :func:`level_offsets` and ``in_scale``."""
    return regression_metrics(y_true, y_pred) | level_offsets(y_true, y_pred) | {"in_scale": in_scale(y_pred)}


def domain_discrepancy(source_emb: ArrayLike, target_emb: ArrayLike) -> float:
    """D(S', T'; phi) = || mean phi(S') - mean phi(T') ||_2 between two sets of embeddings.

    ``source_emb``: ``(Ns, D)``, ``target_emb``: ``(Nt, D)`` — e.g. ``model.forward_features`` on source and
    target segments (the penultimate embedding).
    """
    s, t = _as_2d(source_emb, "source_emb"), _as_2d(target_emb, "target_emb")
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"embedding sizes differ: source {s.shape[1]}, target {t.shape[1]}")
    if len(s) == 0 or len(t) == 0:
        raise ValueError("domain_discrepancy needs at least one source and one target embedding")
    return float(np.linalg.norm(s.mean(axis=0) - t.mean(axis=0)))


def domain_accuracy(logits: ArrayLike, domain_labels: ArrayLike) -> float:
    """Accuracy of a domain head: a logit > 0 predicts label 1, otherwise 0 (``DomainHead``: 1 = target)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(domain_labels, dtype=np.float64).reshape(-1)
    if z.shape != y.shape:
        raise ValueError(f"{z.size} logits but {y.size} domain labels")
    if z.size == 0:
        raise ValueError("domain_accuracy needs at least one logit")
    return float(((z > 0) == (y > 0.5)).mean())
