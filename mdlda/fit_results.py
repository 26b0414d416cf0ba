"""What :func:`mdlda.training.fit` reports: an :class:`EpochResult` to its ``on_epoch`` callback after every epoch,
a :class:`FitResult` when it ends."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor


@dataclass
class EpochResult:
    """What :func:`fit` hands to ``on_epoch`` after every epoch.

    ``train``: each step loss averaged over the epoch's batches. ``valid``: ``"loss"`` (MSE, 0..1 scale) and
    :func:`mdlda.metrics.regression_metrics` (``"r_mean"`` is the early-stopping score). ``lr``: the rate used
    in this epoch. ``seconds``: training + validation time; ``samples_per_s``: segments (source + target)
    through the model per training second; ``data_wait_fraction``: time spent waiting for the next training
    batch / training time. :meth:`state` is the resumable state; it can only be taken inside the callback.
    """

    epoch: int
    train: dict[str, float]
    valid: dict[str, float]
    lr: float
    seconds: float
    train_seconds: float
    samples_per_s: float
    data_wait_fraction: float
    is_best: bool
    best_epoch: int | None
    best_score: float
    get_state: Callable[[], dict[str, Any]] | None = field(default=None, repr=False, compare=False)
    device: dict[str, float] = field(default_factory=dict)  # GPU utilisation and memory on CUDA (device_metrics)
    final: bool = False  # the loop ends after this epoch by itself (max_epochs or patience), not by a scheduler

    def state(self) -> dict[str, Any]:
        """The full training state after this epoch (CPU tensors; ``checkpoints.save_training_state``)."""
        if self.get_state is None:
            raise RuntimeError("the training state can only be taken inside the on_epoch callback")
        return self.get_state()

    def summary(self) -> str:
        best = " (best)" if self.is_best else ""
        return (
            f"train loss {self.train['loss']:.4f}, valid r_mean {self.valid['r_mean']:.4f}{best}, {self.seconds:.1f} s"
        )

    def metrics(self) -> dict[str, float]:
        """Flat ``{name: number}`` for MLflow / Tune: ``train_loss``, ``valid_r_mean``, ``lr``, ..."""
        return {
            "epoch": self.epoch,
            **{f"train_{k}": v for k, v in self.train.items()},
            **{f"valid_{k}": v for k, v in self.valid.items()},
            "lr": self.lr,
            "seconds": self.seconds,
            "train_seconds": self.train_seconds,
            "samples_per_s": self.samples_per_s,
            "data_wait_fraction": self.data_wait_fraction,
            "is_best": float(self.is_best),
            "best_score": self.best_score,
            "trained_out": float(self.final),
            **self.device,
        }


@dataclass
class FitResult:
    """How a :func:`fit` ended. ``status``: "completed" (max_epochs), "early_stopped" (patience), "stopped"
    (``on_epoch`` returned True) or "nan" (a NaN/inf loss; ``message`` says where and why). When fit returns,
    the model holds the best epoch's weights (``best_state_dict``, CPU copies) if any epoch was validated.
    ``history``: :meth:`EpochResult.metrics` of every epoch, including those before a resume."""

    status: Literal["completed", "early_stopped", "stopped", "nan"]
    message: str
    epochs_run: int
    best_epoch: int | None
    best_score: float
    best_state_dict: dict[str, Tensor] | None
    best_domain_head_state_dict: dict[str, Tensor] | None
    history: list[dict[str, float]]
