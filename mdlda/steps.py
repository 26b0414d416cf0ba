"""What happens to a batch and in one pass over the data: the three training steps (supervised, DANN,
distillation), the optimiser update with optional mixed precision, a training epoch and the validation pass.

A step is one call of a :class:`mdlda.domain_pair.DomainPair` (the model, the domain head in DANN, and the
``bn_stats`` rule) on a batch prepared by :func:`prepare_batch`, followed by that mode's loss; it returns a
:class:`StepOutput`: the loss tensor to back-propagate and a dict of float losses for logging. Because both
domains go through one call, the same step runs on the bare pair (a Tune trial, a bench) and on a DDP module
around it (the data-parallel student). :func:`train_one_epoch` runs the steps under :class:`Precision` and
applies :func:`optimizer_step`, so the three modes share every other line. :func:`supervised_step`,
:func:`dann_step` and :func:`distill_step` build the pair around a bare model, for callers outside the loop.

**Per-domain forward passes** (docs/method.md): source and target segments never go through the model as
one concatenated batch. Doing so collapsed piano-test correlation even with the adversarial weight at zero,
because BatchNorm batch statistics then mix labelled source clips with unlabelled target segments. The pair gives
each domain its own pass (each BN normalises over its own domain's batch; ``bn_stats`` decides which passes
update the running statistics), and the regression head, with any BN it has, runs on source features only
(DANN) or once per domain (distillation).

Label scale: batches carry ratings on the 1..10 scale; :func:`prepare_batch` divides them by
:data:`mdlda.params.LABEL_SCALE`, so every MSE here is on the model's 0..1 output scale.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdlda.adapt import domain_bce
from mdlda.batches import DOMAIN_PAIRS, batch_size, prepare_batch
from mdlda.domain_pair import DomainPair, PairOutput
from mdlda.metrics import regression_metrics
from mdlda.params import LABEL_SCALE

logger = logging.getLogger(__name__)


class StepOutput(NamedTuple):
    """``loss``: the scalar to back-propagate. ``losses``: floats for logging, ``"loss"`` included."""

    loss: Tensor
    losses: dict[str, float]


def _floats(named: dict[str, Tensor]) -> dict[str, float]:
    """Detached scalars -> floats with one device sync."""
    values = torch.stack([v.detach().float() for v in named.values()]).tolist()
    return dict(zip(named, values, strict=True))


def supervised_loss(out: PairOutput, batch: Mapping[str, Tensor]) -> StepOutput:
    """MSE between the source predictions and the 0..1-scaled labels."""
    loss = F.mse_loss(out.source_pred.float(), batch["labels"])
    return StepOutput(loss, _floats({"loss": loss, "mse": loss}))


def dann_loss(out: PairOutput, batch: Mapping[str, Tensor], adv_lambda: float) -> StepOutput:
    """The DANN loss (Ganin & Lempitsky, 2015) of a :class:`DomainPair` call with a domain head:

    loss = MSE(regression head on source features, source labels)
         + BCE-with-logits(domain head on source and target features)   (:func:`mdlda.adapt.domain_bce`),

    with equal weights; ``adv_lambda`` (from :func:`mdlda.adapt.dann_lambda`, set by the pair's forward) is the
    gradient-reversal weight: how strongly the domain loss pushes the feature extractor (the domain head always
    learns at full weight). Domain labels follow :class:`mdlda.adapt.DomainHead` (target/piano = 1, source = 0);
    ``domain_acc`` is the head's accuracy on this batch (0.5 = domains confused).
    """
    mse = F.mse_loss(out.source_pred.float(), batch["labels"])
    bce = domain_bce(out.source_logits, out.target_logits)
    loss = mse + bce
    with torch.no_grad():
        right = (out.source_logits <= 0).sum() + (out.target_logits > 0).sum()
        acc = right / (out.source_logits.numel() + out.target_logits.numel())
    logs = _floats({"loss": loss, "mse": mse, "domain_bce": bce, "domain_acc": acc})
    logs["adv_lambda"] = float(adv_lambda)
    return StepOutput(loss, logs)


def _weighted(batch: Mapping[str, Tensor], name: str) -> bool:
    return name == "target" and "target_weights" in batch


def distill_loss(out: PairOutput, batch: Mapping[str, Tensor]) -> StepOutput:
    """MSE over the labelled source and pseudo-labelled target segments of a batch (either domain or both, see
    :func:`prepare_batch`), each domain predicted in its own pass.

    The loss is the mean squared error over all labels in the batch; with ``"target_weights"`` each
    pseudo-labelled segment's squared errors are scaled by its weight first (the mean still divides by the number
    of labels, so weights below 1 also lower the target domain's share). ``mse_source`` / ``mse_target``
    (unweighted) are logged for the domains present.
    """
    sums: dict[str, Tensor] = {}
    weighted: dict[str, Tensor] = {}
    count = 0
    preds = {"source": out.source_pred, "target": out.target_pred}
    for (_, label_key), name in zip(DOMAIN_PAIRS, ("source", "target"), strict=True):
        if preds[name] is not None:
            sq = (preds[name].float() - batch[label_key]).pow(2)  # (B_d, 7)
            sums[name] = sq.sum()
            weighted[name] = sq.sum(dim=1).mul(batch["target_weights"]).sum() if _weighted(batch, name) else sums[name]
            count += batch[label_key].numel()
    loss = sum(weighted.values()) / count
    logs = {"loss": loss}
    for name, sq in sums.items():
        n = batch["labels" if name == "source" else "target_labels"].numel()
        logs[f"mse_{name}"] = sq / n
    return StepOutput(loss, _floats(logs))


def run_step(mode: str, net: nn.Module, batch: Mapping[str, Tensor], adv_lambda: float = 0.0) -> StepOutput:
    """One forward call of ``net`` (a :class:`DomainPair`, or a DDP module around one) on a prepared batch of
    ``mode`` ("supervised", "dann", "distill"), and that mode's loss."""
    source, target = batch.get("audio"), batch.get("target_audio")
    if mode == "supervised":
        return supervised_loss(net(source), batch)
    if mode == "dann":
        if source.shape[0] != target.shape[0]:
            raise ValueError(
                "a DANN batch needs equal numbers of source and target segments; "
                f"got {source.shape[0]} and {target.shape[0]}"
            )
        return dann_loss(net(source, target, adv_lambda), batch, adv_lambda)
    return distill_loss(net(source, target), batch)


def supervised_step(model: nn.Module, batch: Mapping[str, Tensor]) -> StepOutput:
    """:func:`supervised_loss` of ``model(audio)`` (any module with ``forward`` will do)."""
    return run_step("supervised", DomainPair(model), batch)


def dann_step(
    model: nn.Module, domain_head: nn.Module, batch: Mapping[str, Tensor], *, adv_lambda: float, bn_stats: str = "both"
) -> StepOutput:
    """One DANN step with per-domain passes (:class:`DomainPair` with the domain head, then :func:`dann_loss`).
    The batch must hold equally many source (``"audio"``, ``"labels"``) and target (``"target_audio"``)
    segments; ``bn_stats`` names the domain(s) whose passes update the BatchNorm running statistics."""
    return run_step("dann", DomainPair(model, domain_head, bn_stats), batch, adv_lambda)


def distill_step(model: nn.Module, batch: Mapping[str, Tensor], bn_stats: str = "both") -> StepOutput:
    """:func:`distill_loss` with one forward pass per domain present (:class:`DomainPair` without a head)."""
    return run_step("distill", DomainPair(model, None, bn_stats), batch)


def resolve_device(device: str) -> torch.device:
    """ "auto" -> CUDA when available, else CPU; a CUDA device without CUDA is an error."""
    resolved = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return resolved


class Precision:
    """Mixed precision: autocast of the network to bf16 (or fp16 with a GradScaler, CUDA only); fp32 otherwise.

    The front end turns autocast off for itself (:mod:`mdlda.frontend`), so the spectrogram is float32 and the
    convolutions and linear layers after it run in the autocast dtype; losses are computed in float32. On a CPU,
    ``enabled=True`` is ignored with a logged note unless ``on_cpu`` (``TrainConfig.mixed_precision_cpu``): then
    the CPU autocasts to bf16 (fast only on CPUs with AMX / AVX512-BF16, slower elsewhere).
    """

    def __init__(self, enabled: bool, device: torch.device, dtype: str = "bfloat16", on_cpu: bool = False) -> None:
        self.dtype: torch.dtype | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.device_type = device.type
        if not enabled:
            return
        if device.type != "cuda":
            if device.type == "cpu" and on_cpu:
                if dtype != "bfloat16":
                    logger.warning("mixed precision on a CPU uses bfloat16 (not %s)", dtype)
                self.dtype = torch.bfloat16
            else:
                logger.warning("mixed_precision is CUDA-only: training on %s in float32", device)
            return
        self.dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float16
        if self.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            logger.warning("this GPU has no bfloat16: mixed precision uses float16 with a GradScaler")
            self.dtype = torch.float16
        if self.dtype == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda")

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype is not None else nullcontext()


def optimizer_step(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    grad_clip_norm: float | None = None,
    after_backward: Callable[[list[Tensor]], None] | None = None,
) -> None:
    """Backward (under DDP the gradients are averaged across ranks by the time it returns),
    ``after_backward(params)`` (e.g. to inspect the gradients), optional clipping of the global gradient norm,
    optimiser step (via the GradScaler if any)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler = precision.scaler
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if after_backward is not None:
            after_backward(params)
        if grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if after_backward is not None:
        after_backward(params)
    if grad_clip_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()


def nonfinite_message(losses: Mapping[str, float], batch: Mapping[str, Tensor]) -> str | None:
    """None if every loss is finite, else a message naming the bad losses and the likely cause."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if not bad:
        return None
    inputs = [
        k
        for k in ("audio", "target_audio")
        if k in batch and batch[k].is_floating_point() and not torch.isfinite(batch[k]).all()
    ]
    cause = (
        f"the batch's {' and '.join(inputs)} contain NaN/inf samples"
        if inputs
        else "the inputs were finite, so training diverged (lower the lr, clip gradients or check the data)"
    )
    return f"non-finite loss ({', '.join(f'{k}={v}' for k, v in bad.items())}): {cause}"


class TrainPass(NamedTuple):
    """One pass over the training batches: mean step losses, seconds, segments seen (source + target),
    seconds spent waiting for the next batch, and ``error`` if a loss became NaN/inf (then the pass ends)."""

    losses: dict[str, float]
    seconds: float
    samples: int
    data_wait: float
    error: str | None = None


def train_one_epoch(
    net: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    mode: str,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    device: torch.device,
    *,
    adv_lambda: float = 0.0,
    grad_clip_norm: float | None = None,
    after_backward: Callable[[list[Tensor]], None] | None = None,
    pin_memory: bool = False,
) -> TrainPass:
    """Train ``net`` (a :class:`DomainPair`, or a DDP module around one) for one pass over ``batches`` with the
    step of ``mode``; ``pin_memory``: see :func:`mdlda.batches.prepare_batch`."""
    net.train()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}  # batches that logged each loss (a pooled student batch holds one domain)
    n_batches = samples = 0
    wait = 0.0
    start = time.perf_counter()
    iterator = iter(batches)
    while True:
        t = time.perf_counter()
        raw = next(iterator, None)
        wait += time.perf_counter() - t
        if raw is None:
            break
        batch = prepare_batch(raw, mode, device, pin_memory)
        with precision.autocast():
            out = run_step(mode, net, batch, adv_lambda)
        problem = nonfinite_message(out.losses, batch)
        if problem is not None:
            return TrainPass({}, time.perf_counter() - start, samples, wait, f"batch {n_batches}: {problem}")
        optimizer_step(out.loss, optimizer, precision, grad_clip_norm, after_backward)
        for k, v in out.losses.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
        n_batches += 1
        samples += batch_size(batch)
    if n_batches == 0:
        raise ValueError("the training batches were empty")
    return TrainPass({k: v / counts[k] for k, v in sums.items()}, time.perf_counter() - start, samples, wait)


@torch.no_grad()
def validation_outputs(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    device: torch.device | str = "cpu",
    precision: Precision | None = None,
) -> tuple[Tensor, Tensor]:
    """``(predictions, labels)``, both (N, 7) on the 0..1 scale, of ``model`` (put in eval mode) over
    ``{"audio", "labels"}`` batches (ratings 1..10)."""
    model.eval()
    autocast = precision.autocast if precision is not None else nullcontext
    preds, labels = [], []
    for raw in batches:
        b = prepare_batch(raw, "supervised", device)
        with autocast():
            preds.append(model(b["audio"]).float().cpu())  # (B, 7)
        labels.append(b["labels"].cpu())
    if not preds:
        raise ValueError("the validation batches were empty")
    return torch.cat(preds), torch.cat(labels)


def validation_metrics(pred: Tensor, y: Tensor) -> dict[str, float]:
    """``{"loss": MSE on the 0..1 scale, **regression_metrics(...)}``: r and RMSE per feature and their means
    (``"r_mean"``, ``"rmse_mean"``) on the rating scale."""
    loss = F.mse_loss(pred, y).item()
    return {"loss": loss, **regression_metrics(y.numpy() * LABEL_SCALE, pred.numpy() * LABEL_SCALE)}


def evaluate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    device: torch.device | str = "cpu",
    precision: Precision | None = None,
) -> dict[str, float]:
    """:func:`validation_metrics` of :func:`validation_outputs`."""
    return validation_metrics(*validation_outputs(model, batches, device, precision))
