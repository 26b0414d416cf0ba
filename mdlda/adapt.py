"""Domain-adversarial training (DANN): gradient reversal, the domain head, its loss and the lambda schedule.

Ganin & Lempitsky (2015), "Unsupervised Domain Adaptation by Backpropagation" (ICML); Ganin et al. (2016),
JMLR 17(59). A domain classifier learns to tell source (labelled, non-piano) from target (unlabelled piano)
embeddings; the gradient-reversal layer in front of it makes the feature extractor *maximise* that
classifier's loss, so the embedding phi becomes domain-confusing while the regression head keeps it
predictive.

How the training step uses it (docs/method.md): source and target go through
``model.forward_features`` in two separate calls (BatchNorm normalises each domain on its own), the regression
head sees source features only, and :func:`domain_loss` runs the domain head on both. The reversal weight
follows :func:`dann_lambda`, whose ``scale`` is the "adversarial weight scale" the teacher sweep searches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lambda_: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(lambda_)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (lambda_,) = ctx.saved_tensors
        return -lambda_.to(grad.dtype) * grad, None


class GradientReversal(nn.Module):
    """Identity on the way forward, ``-lambda`` times the gradient on the way back (Ganin & Lempitsky, 2015).

    ``forward(x (B, ...)) -> (B, ...)``, the same tensor values; ``d loss / d x = -lambda * d loss / d out``.

    ``lambda`` is a 0-dim float buffer, set by the schedule through :meth:`set_lambda` (no graph or optimizer
    rebuild, follows ``.to(device)``). It is **non-persistent**: it is a function of training progress, not
    learned state; :func:`dann_lambda` recomputes it from the epoch on resume, and a checkpoint loaded later
    (or into a differently scheduled run) never carries a stale training-time weight.
    """

    def __init__(self, lambda_: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("lambda_", torch.tensor(float(lambda_)), persistent=False)

    def set_lambda(self, value: float) -> None:
        self.lambda_.fill_(float(value))

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_.item():.4g}"

    def forward(self, x: Tensor) -> Tensor:
        return _ReverseGrad.apply(x, self.lambda_)


def lambda_schedule(p: float, gamma: float = 10.0) -> float:
    """Ganin's ramp ``2 / (1 + exp(-gamma p)) - 1`` for training progress ``p`` in [0, 1] (0 -> 0, 1 -> ~1).

    p = 0.05 -> 0.245, p = 0.5 -> 0.987 (gamma = 10).
    """
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def dann_lambda(epoch: float, schedule_epochs: float = 20, scale: float = 1.0, gamma: float = 10.0) -> float:
    """Reversal weight at (possibly fractional) ``epoch``, ramping over ``schedule_epochs`` then held:

        scale * lambda_schedule(min(epoch / schedule_epochs, 1), gamma)

    ``scale`` is the adversarial weight scale the teacher sweep searches (docs/method.md has its measured effect).
    """
    if schedule_epochs <= 0:
        raise ValueError(f"schedule_epochs must be positive, got {schedule_epochs}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return scale * lambda_schedule(min(epoch / schedule_epochs, 1.0), gamma)


class DomainHead(nn.Module):
    """Gradient reversal, then an MLP ``in_dim -> 50 -> 20 -> 1`` with ReLUs: (B, in_dim) -> (B,) logits.

    A positive logit means "target domain". The MLP has no BatchNorm, so domains may share or split calls.
    """

    def __init__(self, in_dim: int = 512, hidden: Sequence[int] = (50, 20), lambda_: float = 1.0) -> None:
        super().__init__()
        self.grl = GradientReversal(lambda_)
        layers: list[nn.Module] = []
        for dim in hidden:
            layers += [nn.Linear(in_dim, dim), nn.ReLU()]
            in_dim = dim
        layers.append(nn.Linear(in_dim, 1))
        self.mlp = nn.Sequential(*layers)

    def set_lambda(self, value: float) -> None:
        self.grl.set_lambda(value)

    def forward(self, features: Tensor) -> Tensor:
        return self.mlp(self.grl(features)).squeeze(-1)  # (B, in_dim) -> (B, 1) -> (B,)


def domain_loss(head: DomainHead, source: Tensor, target: Tensor) -> Tensor:
    """Mean binary cross-entropy of ``head`` on source (label 0) and target (label 1) features, each (B_d, D).

    Scalar. The head's gradient trains it to separate the domains; the features get the reversed gradient.
    """
    return domain_bce(head(source), head(target))


def domain_bce(source_logits: Tensor, target_logits: Tensor) -> Tensor:
    """Mean BCE-with-logits of domain-head logits, (B_s,) labelled source (0) and (B_t,) target (1). Scalar."""
    logits = torch.cat([source_logits, target_logits]).float()  # (B_s + B_t,)
    labels = torch.cat([logits.new_zeros(source_logits.shape[0]), logits.new_ones(target_logits.shape[0])])
    return F.binary_cross_entropy_with_logits(logits, labels)


# -------------------------------------------------------------------------------- BatchNorm statistics (AdaBN)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches, device: torch.device | str = "cpu") -> int:
    """AdaBN (Li et al., 2016): recompute every BatchNorm's running mean/variance on ``batches`` of one domain.

    ``batches`` yields (B, N) audio tensors (float in [-1, 1] or int16), all from the domain the model will then
    be evaluated on. The weights are unchanged; each BN's statistics become the plain average over every batch
    (``momentum=None``), each batch normalised over its own items as in training. The model is left in eval
    mode; returns the number of segments seen. A model without BatchNorm is returned unchanged (0 segments).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.eval()
    for m in layers:
        m.train()
    seen = 0
    try:
        for audio in batches:
            x = torch.as_tensor(audio).to(device)
            if x.shape[0] < 2:  # a BN in train mode needs more than one item
                continue
            model(x)
            seen += x.shape[0]
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    if seen == 0:
        raise ValueError("recalibrate_batchnorm: no batch of at least 2 segments to compute statistics on")
    return seen
