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
from typing import Any, TypedDict, Unpack

import torch
from torch import Tensor, nn

from mdlda.adapt import dann_lambda
from mdlda.checkpoints import capture_rng_state, seed_everything
from mdlda.devices import DeviceMonitor, place
from mdlda.domain_pair import DomainPair
from mdlda.epoch import EpochTrainer, train_one_epoch, validation_metrics, validation_outputs
from mdlda.fit_calibration import LabelMean, calibrate_kept, training_level
from mdlda.fit_results import EpochResult, FitResult
from mdlda.fit_state import STATE_FORMAT, FitState, state_of
from mdlda.precision import Precision, resolve_device
from mdlda.replicas import average_running_stats, world_size
from mdlda.train_config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["STATE_FORMAT", "EpochResult", "FitHooks", "FitResult", "TrainConfig", "fit"]

Batch = Mapping[str, Any]


class FitHooks(TypedDict, total=False):
    """How a caller reaches into :func:`fit`'s loop (every one optional; see :func:`fit`)."""

    on_epoch: Callable[[EpochResult], bool | None] | None
    state: Mapping[str, Any] | None
    after_backward: Callable[[list[Tensor]], None] | None
    wrap: Callable[[nn.Module], nn.Module] | None


def fit(
    model: nn.Module,
    train_batches: Callable[[int], Iterable[Batch]],
    valid_batches: Callable[[], Iterable[Batch]],
    config: TrainConfig,
    domain_head: nn.Module | None = None,
    **hooks: Unpack[FitHooks],
) -> FitResult:
    """Train ``model`` (and ``domain_head`` in "dann" mode, or in "distill" mode for an adversarial student whose
    batches hold both domains) and keep the weights of the best validation epoch.

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
    if config.mode == "supervised" and domain_head is not None:
        logger.warning("domain_head is ignored in mode %r", config.mode)
        domain_head = None
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        fitter = _Fit(model, domain_head, config, hooks)
        return fitter.run(train_batches, valid_batches, hooks.get("on_epoch"), hooks.get("state"))
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


class _Fit(FitState):
    """The loop; its state between epochs and the snapshot a run resumes from are :class:`FitState`'s."""

    def __init__(self, model: nn.Module, head: nn.Module | None, config: TrainConfig, hooks: FitHooks) -> None:
        self.model, self.head, self.config = model, head, config
        wrap = hooks.get("wrap")
        self.device = resolve_device(config.device)
        params = place(model, head, self.device, config.channels_last, config.compile)
        # a supervised batch has one domain: its pass always updates the running statistics
        bn_stats = config.bn_stats if config.mode != "supervised" else "both"
        pair = DomainPair(model, head, bn_stats, predict_target=config.mode == "distill")
        self.net = wrap(pair) if wrap is not None else pair
        self.replicated = wrap is not None and world_size() > 1
        self.precision = Precision(config.mixed_precision, self.device, config.amp_dtype, config.mixed_precision_cpu)
        self.gpu = DeviceMonitor(self.device)
        self.optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma
        )
        self.trainer = EpochTrainer(
            self.net,
            config.mode,
            self.optimizer,
            self.precision,
            self.device,
            grad_clip_norm=config.grad_clip_norm,
            after_backward=hooks.get("after_backward"),
            pin_memory=config.pin_memory,
        )
        self.init_state()

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
                return self._finish("early_stopped", self.patience_message())
            epoch = self.next_epoch
            t0 = time.perf_counter()
            adv_lambda = 0.0
            if self.head is not None:
                adv_lambda = dann_lambda(epoch, cfg.lambda_schedule_epochs, cfg.adv_scale, cfg.lambda_gamma)
            levels = LabelMean()
            train = train_one_epoch(self.trainer, levels.tap(train_batches(epoch)), adv_lambda)
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
                self.best_model, self.best_head = state_of(self.model), state_of(self.head)
                if self.calibrates:
                    level = training_level(levels, len(self.model.output_shift), self.device)
                    valid |= calibrate_kept(self.best_model, pred, labels, level)
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
                return self._finish("early_stopped", self.patience_message())
        return self._finish("completed", f"reached max_epochs={cfg.max_epochs}")

    @property
    def calibrates(self) -> bool:
        return self.config.calibrate == "affine" and hasattr(self.model, "set_output_calibration")

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
