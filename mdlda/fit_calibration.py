"""The output calibration of the kept epoch (:mod:`mdlda.calibration`), as :func:`mdlda.training.fit` does it: the
training labels' mean of the epoch, summed over the replicas, and the calibration written into the kept weights."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mdlda.calibration import fit_output_affine
from mdlda.epoch import validation_metrics
from mdlda.params import LABEL_SCALE
from mdlda.replicas import sum_over_ranks

Batch = Mapping[str, Any]


class LabelMean:
    """The mean of the source labels (``"labels"``, 1..10) of the batches that pass through :meth:`tap`, on the
    model's 0..1 scale: one epoch's pass over the training set. Pseudo-labels (``"target_labels"``) do not count."""

    def __init__(self) -> None:
        self.sum: np.ndarray | None = None
        self.rows = 0

    def tap(self, batches: Iterable[Batch]) -> Iterable[Batch]:
        for batch in batches:
            y = batch.get("labels") if isinstance(batch, Mapping) else None
            if y is not None:
                y = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y, dtype=np.float64)
                self.sum = y.sum(axis=0) + (0 if self.sum is None else self.sum)
                self.rows += len(y)
            yield batch


def training_level(levels: LabelMean, outputs: int, device: torch.device) -> np.ndarray | None:
    """The training labels' mean over every rank's share (each rank reads part of the training set; the
    replicas must end with one calibration), 0..1 scale; None without labels. ``outputs``: the model's outputs."""
    sums = levels.sum if levels.sum is not None else np.zeros(outputs)
    both = torch.from_numpy(np.append(sums, levels.rows)).to(device)
    both = sum_over_ranks(both).cpu().numpy()
    return None if both[-1] == 0 else both[:-1] / both[-1] / LABEL_SCALE


def calibrate_kept(kept: dict[str, Tensor], pred: Tensor, labels: Tensor, level: np.ndarray | None) -> dict[str, float]:
    """Fit the output calibration on the kept epoch's validation outputs, centred on the epoch's training
    labels' mean, into the kept weights ``kept``; the training model stays raw. Returns the slope and the
    calibrated validation RMSE."""
    slope, shift = fit_output_affine(pred.numpy(), labels.numpy(), level)
    kept["output_scale"] = torch.full_like(kept["output_scale"], slope)
    kept["output_shift"] = torch.as_tensor(shift, dtype=kept["output_shift"].dtype)
    calibrated = validation_metrics(pred * slope + torch.as_tensor(shift, dtype=pred.dtype), labels)
    return {"calibration_slope": slope, "calibrated_rmse_mean": calibrated["rmse_mean"]}
