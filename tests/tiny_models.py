"""A tiny stand-in model and data for the training-step and training-loop tests."""

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from mdlda.params import NUM_FEATURES
from mdlda.training import TrainConfig

FRAME = 32
N_SAMPLES = FRAME * 20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: thread start-up dominates, and on a busy 2-CPU box two threads can be 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class TinyConfig:
    dim: int = 16
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return {"name": "tiny", **dataclasses.asdict(self)}


class TinyModel(nn.Module):
    """Frames -> Linear -> time mean -> BN -> ReLU (features); Linear -> BN (head, like RF-ResNet's)."""

    def __init__(self, **overrides) -> None:
        super().__init__()
        self.config = TinyConfig(**overrides)
        self.embed_dim = self.config.dim
        self.frontend = nn.Identity()
        self.proj = nn.Linear(FRAME, self.config.dim)
        self.bn = nn.BatchNorm1d(self.config.dim)
        self.drop = nn.Dropout(self.config.dropout)
        self.head = nn.Sequential(nn.Linear(self.config.dim, NUM_FEATURES), nn.BatchNorm1d(NUM_FEATURES))

    def forward_features(self, audio: torch.Tensor) -> torch.Tensor:
        x = audio.float() / 32767.0 if audio.dtype == torch.int16 else audio.float()
        frames = x.reshape(x.shape[0], -1, FRAME)  # (B, T, FRAME)
        h = self.proj(frames).mean(dim=1)  # (B, dim)
        return self.drop(torch.relu(self.bn(h)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(audio))


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio whose frame pattern amplitudes determine the 7 ratings (learnable by TinyModel)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(NUM_FEATURES, FRAME, generator=torch.Generator().manual_seed(123))
    amp = torch.rand(n, NUM_FEATURES, generator=g)  # (n, 7)
    frame = amp @ basis * 0.05  # (n, FRAME)
    audio = frame.repeat(1, N_SAMPLES // FRAME) + 0.01 * torch.randn(n, N_SAMPLES, generator=g)
    return audio, 1.0 + 9.0 * amp


def batches_of(audio, labels, size=8, **extra):
    return [
        {
            "audio": audio[i : i + size],
            "labels": labels[i : i + size],
            **{k: v[i : i + size] for k, v in extra.items()},
        }
        for i in range(0, len(audio), size)
    ]


TRAIN, VALID = make_data(32, 0), make_data(16, 1)
TARGET = make_data(32, 2)


def shuffled_train(epoch: int):
    """Uses the global torch, numpy and Python RNGs on purpose: resuming must restore all three."""
    perm = torch.randperm(len(TRAIN[0]))
    noise = torch.from_numpy(np.random.normal(0, 1e-3, size=TRAIN[0].shape).astype(np.float32))
    size = random.choice([8, 8])
    return batches_of(TRAIN[0][perm] + noise, TRAIN[1][perm], size=size, target_audio=TARGET[0])


def valid():
    return batches_of(*VALID, size=16)


def quick(**kw) -> TrainConfig:
    return TrainConfig(**{"device": "cpu", "lr": 1e-2, "max_epochs": 4, "patience": 50, **kw})


def record_bn_batch_sizes(model: nn.Module) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            seen[name] = []
            module.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].shape[0]))
    return seen


def head_bn_names(model: nn.Module, seen: dict[str, list[int]]) -> set[str]:
    """The BN layers that belong to forward_head (found by running the head alone)."""
    before = {k: len(v) for k, v in seen.items()}
    model.forward_head(torch.randn(4, model.embed_dim))
    names = {k for k, v in seen.items() if len(v) > before[k]}
    for k in seen:
        del seen[k][before[k] :]
    return names
