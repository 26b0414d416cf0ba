"""One pass over the data: a training epoch (the steps of :mod:`mdlda.steps` under mixed precision, with the
optimiser update of :mod:`mdlda.precision`) and the validation pass."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdlda.batches import batch_size, prepare_batch
from mdlda.metrics import regression_metrics
from mdlda.params import LABEL_SCALE
from mdlda.precision import Precision, optimizer_step
from mdlda.steps import run_step


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


@dataclass
class EpochTrainer:
    """What every training pass of a run steps with: ``net`` (a :class:`mdlda.domain_pair.DomainPair`, or a DDP
    module around one), the step ``mode``, the optimiser under ``precision`` on ``device``; ``grad_clip_norm`` and
    ``after_backward`` as in :func:`mdlda.precision.optimizer_step`; ``pin_memory``: see
    :func:`mdlda.batches.prepare_batch`."""

    net: nn.Module
    mode: str
    optimizer: torch.optim.Optimizer
    precision: Precision
    device: torch.device
    grad_clip_norm: float | None = None
    after_backward: Callable[[list[Tensor]], None] | None = None
    pin_memory: bool = False


def train_one_epoch(trainer: EpochTrainer, batches: Iterable[Mapping[str, Any]], adv_lambda: float = 0.0) -> TrainPass:
    """Train ``trainer.net`` for one pass over ``batches`` with the step of ``trainer.mode``."""
    tr = trainer
    tr.net.train()
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
        batch = prepare_batch(raw, tr.mode, tr.device, tr.pin_memory)
        with tr.precision.autocast():
            out = run_step(tr.mode, tr.net, batch, adv_lambda)
        problem = nonfinite_message(out.losses, batch)
        if problem is not None:
            return TrainPass({}, time.perf_counter() - start, samples, wait, f"batch {n_batches}: {problem}")
        optimizer_step(out.loss, tr.optimizer, tr.precision, tr.grad_clip_norm, tr.after_backward)
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


def evaluate(*args, **kwargs) -> dict[str, float]:
    """:func:`validation_metrics` of :func:`validation_outputs` (which takes the same arguments)."""
    return validation_metrics(*validation_outputs(*args, **kwargs))
