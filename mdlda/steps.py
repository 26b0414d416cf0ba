"""What happens to a batch: the three training steps (supervised, DANN in :mod:`mdlda.dann_step`, distillation in
:mod:`mdlda.distill_step`). The optimiser update and mixed precision are in :mod:`mdlda.precision`, a training
epoch and the validation pass in :mod:`mdlda.epoch`.

A step is one call of a :class:`mdlda.domain_pair.DomainPair` (the model, the domain head in DANN, and the
``bn_stats`` rule) on a batch prepared by :func:`prepare_batch`, followed by that mode's loss; it returns a
:class:`mdlda.step_output.StepOutput`: the loss tensor to back-propagate and a dict of float losses for
logging. Because both domains go through one call, the same step runs on the bare pair (a Tune trial, a bench)
and on a DDP module around it (the data-parallel student). :func:`mdlda.epoch.train_one_epoch` runs the steps
under :class:`mdlda.precision.Precision` and applies :func:`mdlda.precision.optimizer_step`, so the three modes
share every other line. :func:`supervised_step`, :func:`dann_step` and :func:`distill_step` build the pair around
a bare model, for callers outside the loop.

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

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from mdlda.dann_step import run_dann
from mdlda.distill_step import run_distill
from mdlda.domain_pair import DomainPair, PairOutput
from mdlda.step_output import StepOutput, floats


def supervised_loss(out: PairOutput, batch: Mapping[str, Tensor]) -> StepOutput:
    """MSE between the source predictions and the 0..1-scaled labels."""
    loss = F.mse_loss(out.source_pred.float(), batch["labels"])
    return StepOutput(loss, floats({"loss": loss, "mse": loss}))


def run_step(mode: str, net: nn.Module, batch: Mapping[str, Tensor], adv_lambda: float = 0.0) -> StepOutput:
    """One forward call of ``net`` (a :class:`DomainPair`, or a DDP module around one) on a prepared batch of
    ``mode`` ("supervised", "dann", "distill"), and that mode's loss."""
    if mode == "supervised":
        return supervised_loss(net(batch.get("audio")), batch)
    if mode == "dann":
        return run_dann(net, batch, adv_lambda)
    return run_distill(net, batch, adv_lambda)


def supervised_step(model: nn.Module, batch: Mapping[str, Tensor]) -> StepOutput:
    """:func:`supervised_loss` of ``model(audio)`` (any module with ``forward`` will do)."""
    return run_step("supervised", DomainPair(model), batch)
