"""The DANN step: the regression loss on the labelled source plus the domain head's loss on both domains, each
domain in its own forward pass of a :class:`mdlda.domain_pair.DomainPair` (see :mod:`mdlda.steps`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdlda.adapt import domain_bce
from mdlda.domain_pair import DomainPair, PairOutput
from mdlda.step_output import StepOutput, floats


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
    logs = floats({"loss": loss, "mse": mse, "domain_bce": bce, "domain_acc": acc})
    logs["adv_lambda"] = float(adv_lambda)
    return StepOutput(loss, logs)


def run_dann(net: nn.Module, batch: Mapping[str, Tensor], adv_lambda: float) -> StepOutput:
    """One forward call of ``net`` (a :class:`DomainPair` with a domain head, or a DDP module around one) on a
    batch of equally many source and target segments, and :func:`dann_loss`."""
    source, target = batch.get("audio"), batch.get("target_audio")
    if source.shape[0] != target.shape[0]:
        raise ValueError(
            "a DANN batch needs equal numbers of source and target segments; "
            f"got {source.shape[0]} and {target.shape[0]}"
        )
    return dann_loss(net(source, target, adv_lambda), batch, adv_lambda)


def dann_step(
    model: nn.Module, domain_head: nn.Module, batch: Mapping[str, Tensor], *, adv_lambda: float, bn_stats: str = "both"
) -> StepOutput:
    """One DANN step with per-domain passes (:class:`DomainPair` with the domain head, then :func:`dann_loss`).
    The batch must hold equally many source (``"audio"``, ``"labels"``) and target (``"target_audio"``)
    segments; ``bn_stats`` names the domain(s) whose passes update the BatchNorm running statistics."""
    return run_dann(DomainPair(model, domain_head, bn_stats), batch, adv_lambda)
