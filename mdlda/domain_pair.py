"""Both domains in one forward call: the module a training step calls, and the one data-parallel training wraps.

A DANN or distillation step passes source and target segments through the network in *separate* passes
(docs/method.md: one concatenated batch lets BatchNorm mix the domains' statistics, which collapsed piano-test r).
DDP (``torch.nn.parallel.DistributedDataParallel``, what ``ray.train.torch.prepare_model`` builds) expects one
forward and one backward per step, so the passes live inside one :meth:`DomainPair.forward`: DDP sees a single
call, autograd sums each parameter's gradient over both passes, and DDP's bucketed hooks then average that sum
across the ranks. Inside the call nothing changes from the single-process step:

- each domain gets its own call of the feature extractor, so every BatchNorm normalises over one domain's batch;
- ``bn_stats`` ("both", "source", "target") names the domain(s) whose passes update the BN running statistics
  (the other passes run with momentum 0: still normalised over their own batch, statistics untouched);
- with a domain head (DANN) the regression head runs on source features only and the domain head, behind
  gradient reversal, on each domain's features; without one (supervised, distillation) the whole model runs once
  per domain present.

:class:`PairOutput` is what the losses in :mod:`mdlda.steps` read.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

from torch import Tensor, nn

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


class PairOutput(NamedTuple):
    """Predictions (B_d, 7) on the 0..1 scale per domain present; domain-head logits (B_d,) in DANN."""

    source_pred: Tensor | None = None
    target_pred: Tensor | None = None  # distillation: the pseudo-labelled segments' predictions
    source_logits: Tensor | None = None  # DANN: the domain head on source features (label 0)
    target_logits: Tensor | None = None  # DANN: ... and on target features (label 1)


class DomainPair(nn.Module):
    """``model`` (an :class:`mdlda.models.base.AudioModel`, or any module with ``forward`` for the non-DANN modes)
    and, for DANN, the domain head, called as ``pair(source, target, adv_lambda)``.

    ``source`` / ``target``: (B_s, N) / (B_t, N) audio, either may be None without a domain head (the student's
    pooled batches hold one domain). ``adv_lambda`` sets the gradient-reversal weight before the passes, so the
    schedule travels with the call (every rank sets the same value). State dicts are the model's and the head's
    own: checkpoints save ``pair.model``, never the pair or a DDP wrapper around it.
    """

    def __init__(
        self,
        model: nn.Module,
        domain_head: nn.Module | None = None,
        bn_stats: str = "both",
        predict_target: bool = False,
    ) -> None:
        super().__init__()
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
        self.model, self.domain_head, self.bn_stats = model, domain_head, bn_stats
        # with a domain head: also predict the target batch (an adversarial student's pseudo-labelled segments)
        self.predict_target = predict_target

    def _updates_stats(self, domain: str) -> bool:
        return self.bn_stats in ("both", domain)

    def forward(self, source: Tensor | None, target: Tensor | None = None, adv_lambda: float = 0.0) -> PairOutput:
        if self.domain_head is not None:
            return self._dann(source, target, adv_lambda)
        preds = {}
        for name, audio in (("source", source), ("target", target)):
            if audio is not None:
                with running_stats_frozen(self.model, not self._updates_stats(name)):
                    preds[name] = self.model(audio)  # (B_d, 7) — BN over this domain only
        if not preds:
            raise ValueError("DomainPair needs a source or a target batch")
        return PairOutput(preds.get("source"), preds.get("target"))

    def _dann(self, source: Tensor | None, target: Tensor | None, adv_lambda: float) -> PairOutput:
        if source is None or target is None:
            raise ValueError(
                "a step with a domain head needs a source and a target batch in every call (DANN; an adversarial "
                "student needs the paired mix, whose batches hold both domains)"
            )
        self.domain_head.set_lambda(adv_lambda)
        with running_stats_frozen(self.model, not self._updates_stats("source")):
            feat_s = self.model.forward_features(source)  # (B, D) — BN over source only
        with running_stats_frozen(self.model, not self._updates_stats("target")):
            feat_t = self.model.forward_features(target)  # (B, D) — BN over target only
        pred = self.model.forward_head(feat_s)  # (B, 7): the regression head (and its BN) sees source only
        pred_t = None
        if self.predict_target:  # the head once more, over the target features (its BN over target only)
            with running_stats_frozen(self.model, not self._updates_stats("target")):
                pred_t = self.model.forward_head(feat_t)
        # the domain head has no BatchNorm, but each domain still gets its own call: (B,) logits each
        return PairOutput(pred, pred_t, self.domain_head(feat_s.float()), self.domain_head(feat_t.float()))
