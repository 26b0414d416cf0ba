"""The training loop's device side: where the model goes and in what form (:func:`place`), and per-epoch device
metrics (GPU utilisation and memory on CUDA, nothing on CPU)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)


class DeviceMonitor:
    """Per-epoch GPU metrics on CUDA: ``gpu_util`` (%, NVML's utilisation over its last sample period, read at
    the end of each epoch through torch.cuda.utilization, which needs the ``nvidia-ml-py`` package),
    ``gpu_mem_peak_gb`` (peak allocated by torch in the epoch) and ``gpu_mem_reserved_gb``. Nothing on CPU. When
    NVML cannot be read on a GPU machine it says so once (a warning, not silence) and logs the memory metrics."""

    def __init__(self, device: torch.device, utilization: Callable[[torch.device], float] | None = None) -> None:
        self.device = device
        self.utilization = utilization or (lambda d: float(torch.cuda.utilization(d)))
        self.warned = False

    def epoch_metrics(self) -> dict[str, float]:
        if self.device.type != "cuda":
            return {}
        out = {
            "gpu_mem_peak_gb": torch.cuda.max_memory_allocated(self.device) / 1e9,
            "gpu_mem_reserved_gb": torch.cuda.memory_reserved(self.device) / 1e9,
        }
        torch.cuda.reset_peak_memory_stats(self.device)
        return {**out, **self.util_metrics()}

    def util_metrics(self) -> dict[str, float]:
        try:
            return {"gpu_util": self.utilization(self.device)}
        except Exception as exc:  # no NVML library or no pynvml module
            if not self.warned:
                self.warned = True
                logger.warning(
                    "GPU utilisation of %s cannot be read (%s: %s); install nvidia-ml-py to log gpu_util",
                    self.device,
                    type(exc).__name__,
                    exc,
                )
            return {}


def compile_network(model: nn.Module) -> None:
    """``TrainConfig.compile``: ``torch.compile`` each direct child of the model except the front end (the
    STFT stays eager), in place (``nn.Module.compile``), so state-dict keys and checkpoints are unchanged."""
    for name, child in model.named_children():
        if name != "frontend":
            child.compile()


def place(
    model: nn.Module, head: nn.Module | None, device: torch.device, channels_last: bool, compile: bool
) -> list[nn.Parameter]:
    """Move the model (and domain head) to ``device``; ``channels_last``: the model's 4-D weights in NHWC, so
    its convolutions produce NHWC maps (the layout tensor cores take under bf16; the state dict loads into a
    model of either layout); ``compile``: :func:`compile_network`. Returns the parameters to optimise."""
    fmt = torch.channels_last if channels_last else torch.preserve_format
    params = list(model.to(device, memory_format=fmt).parameters())
    if head is not None:
        params += list(head.to(device).parameters())
    if compile:
        compile_network(model)
    return params
