"""What data-parallel replicas of a model need besides DDP's gradient averaging (``torch.distributed`` only).

DDP keeps the *parameters* identical: same start (broadcast from rank 0 when it wraps the model), same averaged
gradient, same optimiser step. BatchNorm running statistics are buffers, updated in each rank's forward from its
own batches. The student wraps with ``broadcast_buffers=False`` (training-mode BN normalises over the batch, so
the running statistics never enter a training step, and rank 0's copy need not be broadcast before every forward);
instead :func:`average_running_stats` averages them once per epoch, before validation. That keeps the replicas
identical where it matters -- every rank validates with the same weights and statistics and so takes the same
early-stopping decision, and rank 0's checkpoint holds statistics from every rank's data. Each rank's running
mean is an exponential average of its batch means, so the average over ranks is the exponential average of the
rank-averaged batch means (the variance likewise, of per-rank batch variances). All functions are no-ops outside
a process group of more than one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors]) if tensors else torch.zeros(0)


@torch.no_grad()
def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks (one all-reduce; every rank must call it); the values themselves on one."""
    if world_size() == 1:
        return values
    out = values.clone()
    dist.all_reduce(out)
    return out


@torch.no_grad()
def average_running_stats(model: nn.Module) -> None:
    """Replace every BatchNorm's running mean and variance by their mean over the ranks (one all-reduce)."""
    world = world_size()
    if world == 1:
        return
    stats = [
        t
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for t in (m.running_mean, m.running_var)
    ]
    if not stats:
        return
    flat = _flat(stats).to(stats[0].device)
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in stats:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


@torch.no_grad()
def replica_spread(model: nn.Module) -> float:
    """The largest difference between any two ranks' values of any parameter or floating-point buffer
    (0.0 = identical replicas; two all-reduces of the flattened state, MIN and MAX)."""
    if world_size() == 1:
        return 0.0
    tensors = [p for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
    lo = _flat(tensors).to(tensors[0].device)
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return float((hi - lo).max().item()) if lo.numel() else 0.0
