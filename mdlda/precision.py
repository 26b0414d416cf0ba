"""Where and in which precision a model trains: the device, mixed precision, and the optimiser update that goes
with it (backward, optional gradient clipping, the GradScaler's step when there is one)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """ "auto" -> CUDA when available, else CPU; a CUDA device without CUDA is an error."""
    resolved = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return resolved


class Precision:
    """Mixed precision: autocast of the network to bf16 (or fp16 with a GradScaler, CUDA only); fp32 otherwise.

    The front end turns autocast off for itself (:mod:`mdlda.frontend`), so the spectrogram is float32 and the
    convolutions and linear layers after it run in the autocast dtype; losses are computed in float32. On a CPU,
    ``enabled=True`` is ignored with a logged note unless ``on_cpu`` (``TrainConfig.mixed_precision_cpu``): then
    the CPU autocasts to bf16 (fast only on CPUs with AMX / AVX512-BF16, slower elsewhere).
    """

    def __init__(self, enabled: bool, device: torch.device, dtype: str = "bfloat16", on_cpu: bool = False) -> None:
        self.dtype: torch.dtype | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.device_type = device.type
        if not enabled:
            return
        if device.type != "cuda":
            if device.type == "cpu" and on_cpu:
                if dtype != "bfloat16":
                    logger.warning("mixed precision on a CPU uses bfloat16 (not %s)", dtype)
                self.dtype = torch.bfloat16
            else:
                logger.warning("mixed_precision is CUDA-only: training on %s in float32", device)
            return
        self.dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float16
        if self.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            logger.warning("this GPU has no bfloat16: mixed precision uses float16 with a GradScaler")
            self.dtype = torch.float16
        if self.dtype == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda")

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype is not None else nullcontext()


def optimizer_step(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    grad_clip_norm: float | None = None,
    after_backward: Callable[[list[Tensor]], None] | None = None,
) -> None:
    """Backward (under DDP the gradients are averaged across ranks by the time it returns),
    ``after_backward(params)`` (e.g. to inspect the gradients), optional clipping of the global gradient norm,
    optimiser step (via the GradScaler if any)."""
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
