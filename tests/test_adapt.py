"""Gradient reversal, lambda schedule, domain head, and that a DANN step confuses the domain head."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mdlda.adapt import DomainHead, GradientReversal, dann_lambda, domain_loss, lambda_schedule


def _grad(x: torch.Tensor, layer: nn.Module | None) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    w = torch.linspace(-1.0, 2.0, x.shape[-1])
    y = layer(x) if layer is not None else x
    (torch.sin(y * w) * y).sum().backward()  # a nonlinear loss, so the gradient depends on x
    return x.grad


def test_gradient_reversal_is_identity_forward() -> None:
    x = torch.randn(4, 6)
    torch.testing.assert_close(GradientReversal(0.7)(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("lam", [1.0, 0.37, 0.0])
def test_gradient_reversal_flips_and_scales_exactly(lam: float) -> None:
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    plain = _grad(x, None)
    grl = GradientReversal()
    grl.set_lambda(lam)
    reversed_ = _grad(x, grl)
    torch.testing.assert_close(reversed_, -torch.tensor(lam) * plain, rtol=0, atol=0)
    if lam > 0:
        assert (reversed_ * plain <= 0).all() and (reversed_ != 0).any()


def test_lambda_buffer_is_non_persistent_and_follows_dtype() -> None:
    grl = GradientReversal(0.5)
    assert "lambda_" not in grl.state_dict()
    assert dict(grl.named_buffers())["lambda_"].item() == 0.5
    assert grl.to(torch.float64).lambda_.dtype == torch.float64


def test_lambda_schedule_values() -> None:
    assert lambda_schedule(0.0) == 0.0
    assert lambda_schedule(1 / 20) == pytest.approx(0.2449, abs=1e-4)
    assert lambda_schedule(0.5) == pytest.approx(0.9866, abs=1e-4)
    assert lambda_schedule(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    values = [lambda_schedule(p / 10) for p in range(11)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))


def test_dann_lambda() -> None:
    assert dann_lambda(0) == 0.0
    assert dann_lambda(1, schedule_epochs=20) == pytest.approx(lambda_schedule(0.05))
    assert dann_lambda(1, schedule_epochs=20, scale=0.3) == pytest.approx(0.3 * 0.2449, abs=1e-4)
    assert dann_lambda(40, schedule_epochs=20) == lambda_schedule(1.0)  # held after the ramp
    with pytest.raises(ValueError):
        dann_lambda(1, schedule_epochs=0)
    with pytest.raises(ValueError):
        dann_lambda(-1)


def test_domain_head_shapes_and_set_lambda() -> None:
    head = DomainHead(in_dim=12)
    assert head(torch.randn(5, 12)).shape == (5,)
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [50, 20, 1]
    head.set_lambda(0.25)
    assert head.grl.lambda_.item() == 0.25


def test_domain_loss_is_bce_with_source_0_target_1() -> None:
    head = DomainHead(in_dim=4)
    s, t = torch.randn(3, 4), torch.randn(2, 4)
    want = F.binary_cross_entropy_with_logits(torch.cat([head(s), head(t)]), torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(domain_loss(head, s, t), want)


def _dann_step_change(lam: float) -> tuple[float, float]:
    """One SGD step on extractor + head -> domain loss of the *pre-step* head before and after the step."""
    torch.manual_seed(0)
    source = torch.randn(32, 8)
    target = torch.randn(32, 8) + 1.0  # shifted domain
    extractor = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
    head = DomainHead(in_dim=16)
    # let the head learn to tell the domains apart first (features fixed), as after some training
    head_opt = torch.optim.SGD(head.parameters(), lr=0.5)
    for _ in range(50):
        head_opt.zero_grad()
        with torch.no_grad():
            fs, ft = extractor(source), extractor(target)
        domain_loss(head, fs, ft).backward()
        head_opt.step()
    head.set_lambda(lam)
    fixed = copy.deepcopy(head)
    with torch.no_grad():
        before = domain_loss(fixed, extractor(source), extractor(target)).item()
    opt = torch.optim.SGD([*extractor.parameters(), *head.parameters()], lr=0.05)
    opt.zero_grad()
    domain_loss(head, extractor(source), extractor(target)).backward()  # separate passes per domain
    opt.step()
    with torch.no_grad():
        after = domain_loss(fixed, extractor(source), extractor(target)).item()
    return before, after


def test_dann_step_confuses_the_domain_head() -> None:
    before, after = _dann_step_change(lam=1.0)
    assert after > before, (before, after)
    # control: the same step without reversal (lambda = -1 is a plain gradient) helps the head instead
    before_plain, after_plain = _dann_step_change(lam=-1.0)
    assert after_plain < before_plain, (before_plain, after_plain)
