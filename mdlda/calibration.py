"""Output calibration: the affine map, fitted on the labelled validation split, that puts a model's outputs on
the rating scale without changing what it ranks.

A regressor whose correlation with the labels is r predicts with the least squared error when its outputs have
r times the labels' spread; a network trained for a few epochs (or early-stopped on r, which cannot see scale)
often has more, and its RMSE ends above that of predicting the mean even where its r is good. At the epoch that
:func:`mdlda.training.fit` keeps, it fits

    calibrated = slope * raw + shift_f

on that epoch's validation outputs: one ``slope`` shared by the 7 features (the least-squares slope of the
pooled, per-feature-centred outputs), clipped to ``[MIN_SLOPE, 1]`` so it only ever shrinks, and a ``shift_f``
per feature that puts the calibrated mean of the validation outputs at the *training* labels' mean (the level
``fit`` collects from the epoch's training batches). The validation split is small (16 clips in the demo, a tenth
of the training set in the real data): its own label mean is a noisy level that added more squared error than
the calibration removed, so only the slope and the model's own offset on it are read from it. A positive
slope per feature leaves every feature's Pearson r (and the ranking of segments, teachers and epochs) exactly as
it was; only the scale and the offset move. The map travels with the model as two buffers
(:meth:`mdlda.models.base.AudioModel.set_output_calibration`), so the registered, served and pseudo-labelling
model all return calibrated ratings. ``train: {calibrate: none}`` keeps the raw outputs.

One slope for all features, not seven: with a small validation split a per-feature slope is mostly noise, and a
feature whose validation correlation happens to be negative would get a slope of 0 (a constant prediction whose r
is undefined).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

# A model with no positive validation covariance keeps this much of its spread: its outputs stay ordered (r
# stays defined) and move almost to the validation mean.
MIN_SLOPE = 0.05


def fit_output_affine(pred: ArrayLike, labels: ArrayLike, level: ArrayLike | None = None) -> tuple[float, np.ndarray]:
    """``(slope, shift (F,))`` with ``labels ~ slope * pred + shift`` (module docstring), on whatever scale the
    arrays share. ``pred``, ``labels``: ``(N, F)`` validation outputs and labels, N >= 2; fewer rows give the
    identity map. ``level`` (F,): the mean the calibrated outputs are centred on (the training labels' mean);
    None uses the validation labels' mean."""
    p, y = np.asarray(pred, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if p.shape != y.shape or p.ndim != 2:
        raise ValueError(f"pred and labels must be (N, F) arrays of one shape, got {p.shape} and {y.shape}")
    if len(p) < 2:
        return 1.0, np.zeros(p.shape[1])
    pc, yc = p - p.mean(axis=0), y - y.mean(axis=0)
    var = float((pc**2).sum())
    slope = float((pc * yc).sum()) / var if var > 0 else MIN_SLOPE
    slope = min(max(slope, MIN_SLOPE), 1.0)
    centre = y.mean(axis=0) if level is None else np.asarray(level, dtype=np.float64)
    return slope, centre - slope * p.mean(axis=0)
