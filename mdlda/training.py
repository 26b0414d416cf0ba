"""The one training loop, shared by the teachers (DANN), the baselines (supervised) and the student (distill).

The caller decides what data and which losses go in; :func:`fit` does the rest the same way for all of them:
Adam + MultiStepLR, early stopping on the validation mean Pearson r with the best weights kept, optional mixed
precision (CUDA) and gradient clipping, an ``on_epoch`` callback (Ray Tune / Ray Train report from there and
may stop the run), exact resumption from a saved state, and a NaN/inf loss ending the run at once with
``status == "nan"``. No Ray here: a Tune trainable or a Ray Train worker passes its own batches and callback.

Epochs are numbered from 0: ``train_batches(epoch)``, :func:`mdlda.adapt.dann_lambda` and
:attr:`EpochResult.epoch` all use the same number.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from mdlda.adapt import dann_lambda
from mdlda.calibration import fit_output_affine
from mdlda.checkpoints import capture_rng_state, restore_rng_state, seed_everything, to_cpu
from mdlda.devices import DeviceMonitor, place
from mdlda.domain_pair import DomainPair
from mdlda.params import LABEL_SCALE
from mdlda.replicas import average_running_stats, sum_over_ranks, world_size
from mdlda.steps import Precision, resolve_device, train_one_epoch, validation_metrics, validation_outputs
from mdlda.train_config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["EpochResult", "FitResult", "TrainConfig", "fit"]

Batch = Mapping[str, Any]
STATE_FORMAT = 1


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


def fit(
    model: nn.Module,
    train_batches: Callable[[int], Iterable[Batch]],
    valid_batches: Callable[[], Iterable[Batch]],
    config: TrainConfig,
    domain_head: nn.Module | None = None,
    on_epoch: Callable[[EpochResult], bool | None] | None = None,
    state: Mapping[str, Any] | None = None,
    after_backward: Callable[[list[Tensor]], None] | None = None,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> FitResult:
    """Train ``model`` (and ``domain_head`` in "dann" mode) and keep the weights of the best validation epoch.

    ``train_batches(epoch)`` yields batch dicts: ``"audio"`` (B, N) float/int16 and ``"labels"`` (B, 7),
    ratings 1..10; "dann" adds ``"target_audio"`` (as many segments as the source); "distill" adds
    ``"target_audio"`` and ``"target_labels"``. ``valid_batches()`` yields ``{"audio", "labels"}``.
    ``on_epoch(result)`` runs after every epoch and may return True to stop. ``state``: an
    :meth:`EpochResult.state` (or ``checkpoints.load_training_state``) to resume from; given the same data,
    the run then continues exactly as if never interrupted. A fresh run is seeded with ``config.seed`` (call
    :func:`mdlda.checkpoints.seed_everything` before building the model for a fully reproducible run).
    ``after_backward(params)`` runs after every backward pass, before clipping and the optimiser step.

    ``wrap(pair)``: data-parallel training. The model (and domain head) go into one
    :class:`mdlda.domain_pair.DomainPair`, which takes both domains in one forward call, and the training steps
    call ``wrap(pair)`` instead (a Ray Train worker passes ``ray.train.torch.prepare_model``: DDP). After every
    training pass the replicas' BatchNorm statistics are averaged (:mod:`mdlda.replicas`), so all ranks validate
    alike. Checkpoints, ``state`` and the returned weights are always the unwrapped model's.
    """
    if config.mode == "dann" and domain_head is None:
        raise ValueError("mode 'dann' needs a domain_head (mdlda.adapt.DomainHead)")
    if config.mode != "dann" and domain_head is not None:
        logger.warning("domain_head is ignored in mode %r", config.mode)
        domain_head = None
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        fitter = _Fit(model, domain_head, config, after_backward, wrap)
        return fitter.run(train_batches, valid_batches, on_epoch, state)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


class _LabelMean:
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


def _state_of(module: nn.Module | None) -> dict[str, Tensor] | None:
    return None if module is None else to_cpu(module.state_dict())


class _Fit:
    """The loop and its state; :meth:`snapshot` and :meth:`restore` mirror each other line by line."""

    def __init__(self, model: nn.Module, head: nn.Module | None, config: TrainConfig, after_backward, wrap) -> None:
        self.model, self.head, self.config, self.after_backward = model, head, config, after_backward
        self.device = resolve_device(config.device)
        params = place(model, head, self.device, config.channels_last, config.compile)
        # a supervised batch has one domain: its pass always updates the running statistics
        pair = DomainPair(model, head, config.bn_stats if config.mode != "supervised" else "both")
        self.net = wrap(pair) if wrap is not None else pair
        self.replicated = wrap is not None and world_size() > 1
        self.precision = Precision(config.mixed_precision, self.device, config.amp_dtype, config.mixed_precision_cpu)
        self.gpu = DeviceMonitor(self.device)
        self.optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma
        )
        self.next_epoch, self.bad_epochs = 0, 0
        self.best_score, self.best_epoch = -math.inf, None
        self.best_criterion = -math.inf  # the select_on number at the best epoch, larger is better
        self.best_model: dict[str, Tensor] | None = None
        self.best_head: dict[str, Tensor] | None = None
        self.history: list[dict[str, float]] = []
        self.rng: dict[str, Any] = {}

    def snapshot(self) -> dict[str, Any]:
        scaler = self.precision.scaler
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "next_epoch": self.next_epoch,
            "model": _state_of(self.model),
            "domain_head": _state_of(self.head),
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "scheduler": to_cpu(self.scheduler.state_dict()),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "best_score": self.best_score,
            "best_criterion": self.best_criterion,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "best_model": self.best_model,
            "best_domain_head": self.best_head,
            "history": [dict(h) for h in self.history],
            "rng": self.rng,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"training state format {state.get('format')!r}; this code reads {STATE_FORMAT}")
        saved, now = state["config"], self.config.to_dict()
        if saved.get("mode") != now["mode"]:
            raise ValueError(f"cannot resume a {saved.get('mode')!r} run in mode {now['mode']!r}")
        changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
        if changed:
            logger.warning("resuming with a changed config: %s", ", ".join(changed))
        self.model.load_state_dict(state["model"])
        if self.head is not None:
            self.head.load_state_dict(state["domain_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        self.next_epoch, self.bad_epochs = int(state["next_epoch"]), int(state["bad_epochs"])
        self.best_score, self.best_epoch = float(state["best_score"]), state["best_epoch"]
        self.best_criterion = float(state.get("best_criterion", state["best_score"]))  # older states: r_mean
        self.best_model, self.best_head = state["best_model"], state["best_domain_head"]
        self.history = [dict(h) for h in state["history"]]
        self.rng = state["rng"]
        restore_rng_state(state["rng"])

    def run(self, train_batches, valid_batches, on_epoch, state) -> FitResult:
        cfg = self.config
        if state is not None:
            self.restore(state)
            logger.info("resuming at epoch %d (best r_mean %.4f)", self.next_epoch, self.best_score)
        else:
            seed_everything(cfg.seed)
            if hasattr(self.model, "reset_output_calibration"):  # a warm start from a calibrated model
                self.model.reset_output_calibration()  # trains (and without `calibrate` ends) on raw outputs
        while self.next_epoch < cfg.max_epochs:
            if self.bad_epochs >= cfg.patience:  # only when resuming from a state that had already run out
                return self._finish("early_stopped", self._patience_message())
            epoch = self.next_epoch
            t0 = time.perf_counter()
            adv_lambda = 0.0
            if self.head is not None:
                adv_lambda = dann_lambda(epoch, cfg.lambda_schedule_epochs, cfg.adv_scale, cfg.lambda_gamma)
            levels = _LabelMean()
            train = train_one_epoch(
                self.net,
                levels.tap(train_batches(epoch)),
                cfg.mode,
                self.optimizer,
                self.precision,
                self.device,
                adv_lambda=adv_lambda,
                grad_clip_norm=cfg.grad_clip_norm,
                after_backward=self.after_backward,
                pin_memory=cfg.pin_memory,
            )
            if train.error is not None:
                return self._finish("nan", f"epoch {epoch}, {train.error}")
            if self.replicated:  # every rank validates (and decides) with the same BatchNorm statistics
                average_running_stats(self.model)
            lr = self.optimizer.param_groups[0]["lr"]
            pred, labels = validation_outputs(self.model, valid_batches(), self.device, self.precision)
            valid = validation_metrics(pred, labels)
            if not (math.isfinite(valid["loss"]) and math.isfinite(valid["r_mean"])):
                return self._finish(
                    "nan",
                    f"epoch {epoch}: validation loss={valid['loss']}, "
                    f"r_mean={valid['r_mean']} are not finite; the model diverged",
                )
            self.scheduler.step()
            criterion = valid["r_mean"] if cfg.select_on == "r_mean" else -valid["loss"]
            is_best = criterion > self.best_criterion
            if is_best:
                self.best_score, self.best_epoch, self.bad_epochs = valid["r_mean"], epoch, 0
                self.best_criterion = criterion
                self.best_model, self.best_head = _state_of(self.model), _state_of(self.head)
                if self.calibrates:
                    valid |= self._calibrate_best(pred, labels, self._training_level(levels))
            else:
                self.bad_epochs += 1
            self.next_epoch = epoch + 1
            self.rng = capture_rng_state(self.device)
            result = EpochResult(
                epoch=epoch,
                train=train.losses,
                valid=valid,
                lr=lr,
                seconds=time.perf_counter() - t0,
                train_seconds=train.seconds,
                samples_per_s=train.samples / max(train.seconds, 1e-9),
                data_wait_fraction=train.data_wait / max(train.seconds, 1e-9),
                is_best=is_best,
                best_epoch=self.best_epoch,
                best_score=self.best_score,
                get_state=self.snapshot,
                device=self.gpu.epoch_metrics(),
                final=self.next_epoch >= cfg.max_epochs or self.bad_epochs >= cfg.patience,
            )
            self.history.append(result.metrics())
            logger.info("epoch %d: %s", epoch, result.summary())
            stop = on_epoch(result) if on_epoch is not None else False
            result.get_state = None
            if stop:
                return self._finish("stopped", f"on_epoch asked to stop after epoch {epoch}")
            if self.bad_epochs >= cfg.patience:
                return self._finish("early_stopped", self._patience_message())
        return self._finish("completed", f"reached max_epochs={cfg.max_epochs}")

    @property
    def calibrates(self) -> bool:
        return self.config.calibrate == "affine" and hasattr(self.model, "set_output_calibration")

    def _training_level(self, levels: _LabelMean) -> np.ndarray | None:
        """The training labels' mean over every rank's share (each rank reads part of the training set; the
        replicas must end with one calibration), 0..1 scale; None without labels."""
        sums = levels.sum if levels.sum is not None else np.zeros(len(self.model.output_shift))
        both = torch.from_numpy(np.append(sums, levels.rows)).to(self.device)
        both = sum_over_ranks(both).cpu().numpy()
        return None if both[-1] == 0 else both[:-1] / both[-1] / LABEL_SCALE

    def _calibrate_best(self, pred: Tensor, labels: Tensor, level: np.ndarray | None) -> dict[str, float]:
        """Fit the output calibration on the kept epoch's validation outputs, centred on the epoch's training
        labels' mean (:mod:`mdlda.calibration`), into the kept weights; the training model stays raw. Returns
        the slope and the calibrated validation RMSE."""
        slope, shift = fit_output_affine(pred.numpy(), labels.numpy(), level)
        assert self.best_model is not None
        self.best_model["output_scale"] = torch.full_like(self.best_model["output_scale"], slope)
        self.best_model["output_shift"] = torch.as_tensor(shift, dtype=self.best_model["output_shift"].dtype)
        calibrated = validation_metrics(pred * slope + torch.as_tensor(shift, dtype=pred.dtype), labels)
        return {"calibration_slope": slope, "calibrated_rmse_mean": calibrated["rmse_mean"]}

    def _patience_message(self) -> str:
        return (
            f"no better validation {self.config.select_on} for {self.config.patience} epochs; best r_mean "
            f"{self.best_score:.4f} at epoch {self.best_epoch}"
        )

    def _finish(self, status: str, message: str) -> FitResult:
        (logger.error if status == "nan" else logger.info)("training ended (%s): %s", status, message)
        if self.best_model is not None:
            self.model.load_state_dict(self.best_model)
            if self.head is not None and self.best_head is not None:
                self.head.load_state_dict(self.best_head)
        return FitResult(
            status=status,
            message=message,
            epochs_run=self.next_epoch,
            best_epoch=self.best_epoch,
            best_score=self.best_score,
            best_state_dict=self.best_model,
            best_domain_head_state_dict=self.best_head,
            history=self.history,
        )
