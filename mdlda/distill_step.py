"""The distillation step: MSE over the labelled source and the pseudo-labelled target segments of a batch, each
domain in its own forward pass of a :class:`mdlda.domain_pair.DomainPair` (see :mod:`mdlda.steps`)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from mdlda.adapt import domain_bce
from mdlda.batches import DOMAIN_PAIRS
from mdlda.domain_pair import DomainPair, PairOutput
from mdlda.step_output import StepOutput, floats


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
    return StepOutput(loss, floats(logs))


def run_distill(net: nn.Module, batch: Mapping[str, Tensor], adv_lambda: float = 0.0) -> StepOutput:
    """One forward call of ``net`` (a :class:`DomainPair`, or a DDP module around one) on the domains the batch
    holds, and :func:`distill_loss`.

    With a domain head in the pair (an adversarial student: ``DomainPair(..., predict_target=True)``, batches of
    both domains), the domain head's loss on the labelled and the pseudo-labelled segments is added as in DANN
    (:func:`mdlda.adapt.domain_bce`, gradient reversal at ``adv_lambda``).
    """
    out = net(batch.get("audio"), batch.get("target_audio"), adv_lambda)
    step = distill_loss(out, batch)
    if out.source_logits is None:
        return step
    bce = domain_bce(out.source_logits, out.target_logits)
    logs = step.losses | floats({"domain_bce": bce}) | {"adv_lambda": float(adv_lambda)}
    logs["loss"] = logs["loss"] + logs["domain_bce"]
    return StepOutput(step.loss + bce, logs)


def distill_step(model: nn.Module, batch: Mapping[str, Tensor], bn_stats: str = "both") -> StepOutput:
    """:func:`distill_loss` with one forward pass per domain present (:class:`DomainPair` without a head)."""
    return run_distill(DomainPair(model, None, bn_stats), batch)
