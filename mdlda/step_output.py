"""What every training step returns, shared by the supervised, DANN and distillation steps."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class StepOutput(NamedTuple):
    """``loss``: the scalar to back-propagate. ``losses``: floats for logging, ``"loss"`` included."""

    loss: Tensor
    losses: dict[str, float]


def floats(named: dict[str, Tensor]) -> dict[str, float]:
    """Detached scalars -> floats with one device sync."""
    values = torch.stack([v.detach().float() for v in named.values()]).tolist()
    return dict(zip(named, values, strict=True))
