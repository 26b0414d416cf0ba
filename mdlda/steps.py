"""What happens to a batch and in one pass over the data: the three training steps (supervised, DANN,
distillation), the optimiser update with optional mixed precision, a training epoch and the validation pass.

A step takes a model (``forward_features`` / ``forward_head``, see :mod:`mdlda.models`) and a batch prepared
by :func:`prepare_batch`, and returns a :class:`StepOutput`: the loss tensor to back-propagate and a dict of
float losses for logging. :func:`train_one_epoch` runs the steps under :class:`Precision` and applies
:func:`optimizer_step`, so the three modes share every other line. The supervised and distillation steps call
``model(audio)`` only (any wrapper that exposes ``forward`` will do); the DANN step needs the model's own
``forward_features`` / ``forward_head``.

**Per-domain forward passes** (docs/method.md): source and target segments never go through the model as
one concatenated batch. Doing so collapsed piano-test correlation even with the adversarial weight at zero,
because BatchNorm batch statistics then mix labelled source clips with unlabelled target segments. Here each
domain gets its own ``forward_features`` call (each BN normalises over its own domain's batch; the running
statistics see both), and the regression head, with any BN it has, runs on source features only (DANN) or once
per domain (distillation).

Label scale: batches carry ratings on the 1..10 scale; :func:`prepare_batch` divides them by
:data:`mdlda.params.LABEL_SCALE`, so every MSE here is on the model's 0..1 output scale.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdlda.adapt import domain_loss
from mdlda.batches import DOMAIN_PAIRS, batch_size, prepare_batch
from mdlda.metrics import regression_metrics
from mdlda.params import LABEL_SCALE

logger = logging.getLogger(__name__)


BN_STATS = ("both", "source", "target")


@contextmanager
def running_stats_frozen(model: nn.Module, frozen: bool = True):
    """While active (and ``frozen``), the model's BatchNorm layers still normalise over the batch in train mode
    but leave their running statistics unchanged (momentum 0): how a training step keeps one domain's passes out
    of the statistics used at evaluation (``TrainConfig.bn_stats``)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if frozen else []
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(layers, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


class StepOutput(NamedTuple):
    """``loss``: the scalar to back-propagate. ``losses``: floats for logging, ``"loss"`` included."""

    loss: Tensor
    losses: dict[str, float]


def _floats(named: dict[str, Tensor]) -> dict[str, float]:
    """Detached scalars -> floats with one device sync."""
    values = torch.stack([v.detach().float() for v in named.values()]).tolist()
    return dict(zip(named, values, strict=True))


def supervised_step(model: nn.Module, batch: Mapping[str, Tensor]) -> StepOutput:
    """MSE between ``model(audio)`` and the 0..1-scaled labels."""
    pred = model(batch["audio"])  # (B, 7)
    loss = F.mse_loss(pred.float(), batch["labels"])
    return StepOutput(loss, _floats({"loss": loss, "mse": loss}))


def dann_step(
    model: nn.Module, domain_head: nn.Module, batch: Mapping[str, Tensor], *, adv_lambda: float, bn_stats: str = "both"
) -> StepOutput:
    """One DANN step (Ganin & Lempitsky, 2015) with per-domain passes.

    loss = MSE(regression head on source features, source labels)
         + BCE-with-logits(domain head on source and target features)   (:func:`mdlda.adapt.domain_loss`),

    with equal weights; ``adv_lambda`` (from :func:`mdlda.adapt.dann_lambda`) is the gradient-reversal weight:
    ``bn_stats`` names the domain(s) whose passes update the BatchNorm running statistics ("both", "source",
    "target"); every pass is normalised over its own batch either way.
    how strongly the domain loss pushes the feature extractor (the domain head always learns at full weight).
    Domain labels follow :class:`mdlda.adapt.DomainHead` (target/piano = 1, source = 0); ``domain_acc`` is the
    head's accuracy on this batch (0.5 = domains confused). The batch must hold equally many source
    (``"audio"``, ``"labels"``) and target (``"target_audio"``) segments.
    """
    src, tgt = batch["audio"], batch["target_audio"]
    if src.shape[0] != tgt.shape[0]:
        raise ValueError(
            f"a DANN batch needs equal numbers of source and target segments; got {src.shape[0]} and {tgt.shape[0]}"
        )
    domain_head.set_lambda(adv_lambda)
    with running_stats_frozen(model, bn_stats == "target"):
        feat_s = model.forward_features(src)  # (B, D) — BN over source only
    with running_stats_frozen(model, bn_stats == "source"):
        feat_t = model.forward_features(tgt)  # (B, D) — BN over target only
    mse = F.mse_loss(model.forward_head(feat_s).float(), batch["labels"])  # regression head: source only
    bce = domain_loss(domain_head, feat_s.float(), feat_t.float())
    loss = mse + bce
    with torch.no_grad():
        logits = torch.cat([domain_head(feat_s), domain_head(feat_t)])  # (2B,)
        acc = ((logits[: src.shape[0]] <= 0).sum() + (logits[src.shape[0] :] > 0).sum()) / logits.numel()
    logs = _floats({"loss": loss, "mse": mse, "domain_bce": bce, "domain_acc": acc})
    logs["adv_lambda"] = float(adv_lambda)
    return StepOutput(loss, logs)


def _weighted(batch: Mapping[str, Tensor], name: str) -> bool:
    return name == "target" and "target_weights" in batch


def distill_step(model: nn.Module, batch: Mapping[str, Tensor], bn_stats: str = "both") -> StepOutput:
    """MSE over the labelled source and pseudo-labelled target segments of a batch, one forward pass per domain.

    A batch holds either domain or both (see :func:`prepare_batch`). The loss is the mean squared error over all
    labels in the batch; with ``"target_weights"`` each pseudo-labelled segment's squared errors are scaled by its
    weight first (the mean still divides by the number of labels, so weights below 1 also lower the target
    domain's share). ``mse_source`` / ``mse_target`` (unweighted) are logged for the domains present.
    """
    sums: dict[str, Tensor] = {}
    weighted: dict[str, Tensor] = {}
    count = 0
    for (audio_key, label_key), name in zip(DOMAIN_PAIRS, ("source", "target"), strict=True):
        if audio_key in batch:
            with running_stats_frozen(model, bn_stats not in ("both", name)):
                pred = model(batch[audio_key]).float()  # (B_d, 7) — BN over this domain only
            sq = (pred - batch[label_key]).pow(2)
            sums[name] = sq.sum()
            weighted[name] = sq.sum(dim=1).mul(batch["target_weights"]).sum() if _weighted(batch, name) else sums[name]
            count += batch[label_key].numel()
    loss = sum(weighted.values()) / count
    logs = {"loss": loss}
    for name, sq in sums.items():
        n = batch["labels" if name == "source" else "target_labels"].numel()
        logs[f"mse_{name}"] = sq / n
    return StepOutput(loss, _floats(logs))


def run_step(
    mode: str,
    model: nn.Module,
    batch: Mapping[str, Tensor],
    domain_head: nn.Module | None,
    adv_lambda: float,
    bn_stats: str = "both",
) -> StepOutput:
    """Dispatch to the step of ``mode`` ("supervised", "dann", "distill")."""
    if mode == "dann":
        if domain_head is None:
            raise ValueError("mode 'dann' needs a domain head")
        return dann_step(model, domain_head, batch, adv_lambda=adv_lambda, bn_stats=bn_stats)
    if mode == "distill":
        return distill_step(model, batch, bn_stats)
    return supervised_step(model, batch)


def resolve_device(device: str) -> torch.device:
    """ "auto" -> CUDA when available, else CPU; a CUDA device without CUDA is an error."""
    resolved = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return resolved


class Precision:
    """Mixed precision on CUDA: autocast to bf16 (or fp16 with a GradScaler); plain fp32 elsewhere.

    On a CPU, ``enabled=True`` is ignored with a logged note, so the same config runs on a laptop.
    """

    def __init__(self, enabled: bool, device: torch.device, dtype: str = "bfloat16") -> None:
        self.dtype: torch.dtype | None = None
        self.scaler: torch.amp.GradScaler | None = None
        if not enabled:
            return
        if device.type != "cuda":
            logger.warning("mixed_precision is CUDA-only: training on %s in float32", device)
            return
        self.dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float16
        if self.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            logger.warning("this GPU has no bfloat16: mixed precision uses float16 with a GradScaler")
            self.dtype = torch.float16
        if self.dtype == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda")

    def autocast(self) -> AbstractContextManager:
        return torch.autocast("cuda", dtype=self.dtype) if self.dtype is not None else nullcontext()


def optimizer_step(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    grad_clip_norm: float | None = None,
    after_backward: Callable[[list[Tensor]], None] | None = None,
) -> None:
    """Backward, ``after_backward(params)`` (e.g. an all-reduce of the gradients across workers), optional
    clipping of the global gradient norm, optimiser step (via the GradScaler if any)."""
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
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    mode: str,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    device: torch.device,
    *,
    domain_head: nn.Module | None = None,
    adv_lambda: float = 0.0,
    grad_clip_norm: float | None = None,
    after_backward: Callable[[list[Tensor]], None] | None = None,
    bn_stats: str = "both",
) -> TrainPass:
    """Train ``model`` (and ``domain_head``) for one pass over ``batches`` with the step of ``mode``."""
    model.train()
    if domain_head is not None:
        domain_head.train()
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
        batch = prepare_batch(raw, mode, device)
        with precision.autocast():
            out = run_step(mode, model, batch, domain_head, adv_lambda, bn_stats)
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
def evaluate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    device: torch.device | str = "cpu",
    precision: Precision | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` (put in eval mode) over ``{"audio", "labels"}`` batches (ratings 1..10).

    Returns ``{"loss": MSE on the 0..1 scale, **regression_metrics(...)}``: r and RMSE per feature and their
    means (``"r_mean"``, ``"rmse_mean"``) on the rating scale.
    """
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
    pred, y = torch.cat(preds), torch.cat(labels)
    loss = F.mse_loss(pred, y).item()
    return {"loss": loss, **regression_metrics(y.numpy() * LABEL_SCALE, pred.numpy() * LABEL_SCALE)}
