"""RF-ResNet: the receptive-field-regularised, frequency-aware ResNet used for mid-level features.

Koutini, Eghbal-zadeh, Dorfer & Widmer (2019), "The receptive field as a regularizer in deep convolutional
neural networks for acoustic scene classification" (CP-ResNet, and its frequency-aware variant), as configured
by Chowdhury & Widmer for mid-level features: one stride-2 stem, three stages of basic blocks (3, 1, 1
blocks), max-pooling inside stage 1 only, and 1x1 convs at the end so that the receptive field stays at 95 x
95 bins while the net is deep.

Frequency awareness (CoordConv on the frequency axis): before every conv, one extra input channel holds the
row's frequency position ``2 i / H - 1`` (``i`` = row index, 0 = lowest band), so filters can depend on pitch
height.

Shapes at width 128 for a 15-s segment (about 2.2 M parameters):

    audio (B, 330750) -> spectrogram (B, 1, 149, 469) -> stem (B, 128, 74, 234) -> stage 1 (B, 128, 18, 58)
    -> stage 2 (B, 256, 18, 58) -> stage 3 (B, 512, 18, 58) -> pool (B, 512) -> head (B, 7)

Head (``head``). The reference ends with conv1x1(512 -> 7, no bias) -> BN2d -> global average pool: a
BatchNorm on the 7 outputs. Here the pool comes first (``forward_features`` must return the pooled (B, 512)
embedding), so the options act on the pooled embedding:

- ``"linear"`` (default): Linear(512 -> 7) with bias, weights ~ N(0, 0.01), bias at mid label scale
  (``LABEL_CENTRE``) -- as the VGG-ish head. Predictions start near the label centre with a small spread and
  the spread is learnt, so short runs stay on the rating scale.
- ``"bn"``: the reference form, Linear(512 -> 7, no bias) -> BN1d. In train mode the BN fixes each output's
  spread over the batch to its weight, which starts at ``head_bn_weight``. At the reference's 1.0 that is a
  spread of 10 rating points (labels are on the 0..1 scale), ~4x the labels' own; Adam moves it ~lr per step,
  so a run of a few hundred steps ends with outputs far off the 1..10 scale even when their correlation is
  good. BN1d needs batch > 1 in train mode (batch 1 is fine in eval).

``docs/method.md`` has the measured effect of the choice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdlda.frontend import FrontendConfig
from mdlda.models.base import LABEL_CENTRE, AudioModel, ModelConfig, check_positive_int, init_weights
from mdlda.models.registry import register_model

# ----------------------------------------------------------------------------------------------------- blocks


def frequency_channel(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 1, H, W) whose row ``i`` holds ``2 i / H - 1`` (-1 at the lowest frequency row)."""
    b, _, h, w = x.shape
    pos = torch.arange(h, device=x.device, dtype=x.dtype) * (2.0 / h) - 1.0  # (H,)
    return pos.view(1, 1, h, 1).expand(b, 1, h, w)  # (B, 1, H, W)


class FreqConv2d(nn.Conv2d):
    """Bias-free Conv2d that sees its input plus the frequency-position channel (``in_channels + 1`` inputs).

    Padding defaults to ``kernel_size // 3`` as in CP-ResNet (3 -> 1, 1 -> 0).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
    ) -> None:
        padding = kernel_size // 3 if padding is None else padding
        super().__init__(in_channels + 1, out_channels, kernel_size, stride=stride, padding=padding, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # Same result as conv(cat([x, frequency_channel(x)])) but without a (B, C + 1, H, W) copy: the conv is
        # linear in its input channels, and the frequency channel is the same for every batch item.
        w_x, w_f = self.weight[:, :-1], self.weight[:, -1:]  # (out, C, k, k), (out, 1, k, k)
        y = F.conv2d(x, w_x, None, self.stride, self.padding)  # (B, out, H', W')
        pos = F.conv2d(frequency_channel(x[:1]), w_f, None, self.stride, self.padding)  # (1, out, H', W')
        return y + pos


class BasicBlock(nn.Module):
    """conv(k1) BN ReLU conv(k2) BN + shortcut (identity, or 1x1 conv + BN if channels change), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, k1: int, k2: int) -> None:
        super().__init__()
        self.conv1 = FreqConv2d(in_channels, out_channels, k1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = FreqConv2d(out_channels, out_channels, k2)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                OrderedDict(conv=FreqConv2d(in_channels, out_channels, 1), bn=nn.BatchNorm2d(out_channels))
            )

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))  # (B, out, H, W): padding k // 3 keeps H, W
        y = self.bn2(self.conv2(y))  # (B, out, H, W)
        return torch.relu(y + self.shortcut(x))


# ---------------------------------------------------------------------------------------------------- config

HEADS = ("linear", "bn")
NUM_RHO_CONVS = 8  # convs whose kernel rho decides: stage-1 blocks 2-3, stage 2, stage 3 (two each)


def block_kernels(rho: int) -> tuple[tuple[int, int], ...]:
    """(k1, k2) of the five blocks (stage 1: three, stages 2 and 3: one each) for receptive-field knob rho.

    Koutini et al.'s rule (``get_model_based_on_rho``): the first block is fixed at (3, 1); the following
    convs, counted in network order, are 3x3 up to the ``rho``-th and 1x1 after it. In their 4-4-4-block
    CP-ResNet the default rho = 7 makes stage-1 blocks 2-4 and the first conv of stage 2 3x3; on this 3-1-1
    layout the same rule gives rho = 6 -> ((3, 1), (3, 3), (3, 3), (3, 3), (1, 1)), receptive field 95.
    Smaller rho shrinks the receptive field from the end of stage 2 backwards; rho 7 and 8 make stage 3's
    convs 3x3 (the reference's rho > 7 growth pattern, which interleaves 1x1 and 3x3 convs over its longer
    stages 2-3, has no counterpart with one block per stage).
    """
    if not 0 <= rho <= NUM_RHO_CONVS:
        raise ValueError(f"rho must be in 0..{NUM_RHO_CONVS}, got {rho}")
    k = [3 if i < rho else 1 for i in range(NUM_RHO_CONVS)]
    return ((3, 1), (k[0], k[1]), (k[2], k[3]), (k[4], k[5]), (k[6], k[7]))


@dataclass(frozen=True)
class RFResNetConfig(ModelConfig):
    """``width``: base channels (stages: width, 2x, 4x = embed_dim); ``rho``: see :func:`block_kernels`;
    ``head``: "linear" or "bn" and ``head_bn_weight``: the "bn" head's initial output spread (module docstring)."""

    name = "rfresnet"
    width: int = 128
    rho: int = 6
    num_outputs: int = 7
    head: str = "bn"
    head_bn_weight: float = 0.25
    frontend: FrontendConfig = field(default_factory=FrontendConfig)

    def __post_init__(self) -> None:
        check_positive_int(width=self.width, num_outputs=self.num_outputs)
        block_kernels(self.rho)  # validates rho
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if not self.head_bn_weight > 0:
            raise ValueError(f"head_bn_weight must be > 0, got {self.head_bn_weight!r}")


# ---------------------------------------------------------------------------------------------------- network


class RFResNet(AudioModel):
    """Front end + RF-ResNet; ``forward(audio (B, N)) -> (B, num_outputs)``. See the module docstring."""

    def __init__(self, config: RFResNetConfig | None = None) -> None:
        config = config if config is not None else RFResNetConfig()
        super().__init__(config)
        w = config.width
        kernels = block_kernels(config.rho)
        self.embed_dim = 4 * w
        self.stem = nn.Sequential(FreqConv2d(1, w, 5, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.stage1 = nn.Sequential(
            BasicBlock(w, w, *kernels[0]),
            nn.MaxPool2d(2),
            BasicBlock(w, w, *kernels[1]),
            nn.MaxPool2d(2),
            BasicBlock(w, w, *kernels[2]),
        )
        self.stage2 = nn.Sequential(BasicBlock(w, 2 * w, *kernels[3]))
        self.stage3 = nn.Sequential(BasicBlock(2 * w, 4 * w, *kernels[4]))
        if config.head == "bn":  # the reference's 1x1 conv + BN, applied after the pool (module docstring)
            self.head = nn.Sequential(
                OrderedDict(fc=nn.Linear(4 * w, config.num_outputs, bias=False), bn=nn.BatchNorm1d(config.num_outputs))
            )
        else:
            self.head = nn.Sequential(OrderedDict(fc=nn.Linear(4 * w, config.num_outputs)))
        self.apply(init_weights)
        if config.head == "bn":
            nn.init.constant_(self.head.bn.weight, config.head_bn_weight)
            nn.init.constant_(self.head.bn.bias, LABEL_CENTRE)
        else:
            nn.init.normal_(self.head.fc.weight, std=0.01)  # small start: predictions begin near the centre
            nn.init.constant_(self.head.fc.bias, LABEL_CENTRE)

    def forward_maps(self, spec: Tensor) -> Tensor:
        """(B, 1, 149, T) spectrogram -> (B, 4 width, 18, 58) stage-3 map (for T = 469)."""
        x = self.stem(spec)  # (B, w, 74, 234)
        x = self.stage1(x)  # (B, w, 18, 58)
        x = self.stage2(x)  # (B, 2w, 18, 58)
        return self.stage3(x)  # (B, 4w, 18, 58)

    def features_from_spectrogram(self, spec: Tensor) -> Tensor:
        return self.forward_maps(spec).mean(dim=(2, 3))  # (B, 4w) global average pool

    def regress(self, features: Tensor) -> Tensor:
        return self.head(features)  # (B, 4w) -> (B, num_outputs)

    def layer_list(self) -> list[tuple[int, int, int]]:
        """(kernel, stride, padding) of the main path in order (stem, both convs of each block, pools).

        Shortcut convs are 1x1 and stride 1, so they never widen the receptive field and are left out.
        """
        layers = []
        for module in [*self.stem, *self.stage1, *self.stage2, *self.stage3]:
            convs = [module.conv1, module.conv2] if isinstance(module, BasicBlock) else [module]
            for m in convs:
                if isinstance(m, nn.Conv2d):
                    layers.append((m.kernel_size[0], m.stride[0], m.padding[0]))
                elif isinstance(m, nn.MaxPool2d):
                    layers.append((int(m.kernel_size), int(m.stride), int(m.padding)))
        return layers


def receptive_field(layers: Sequence[tuple[int, int, int]], size: int) -> tuple[int, int]:
    """Receptive field and output size along one axis through a chain of (kernel, stride, padding) layers.

    ``rf += (kernel - 1) * jump; jump *= stride`` (jump = input samples between neighbouring outputs) and
    ``size = (size + 2 padding - kernel) // stride + 1`` (floor, as Conv2d and MaxPool2d). Returns (rf, size).
    """
    rf, jump = 1, 1
    for kernel, stride, padding in layers:
        rf += (kernel - 1) * jump
        jump *= stride
        size = (size + 2 * padding - kernel) // stride + 1
    return rf, size


@register_model
def rfresnet(**overrides) -> RFResNet:
    """RF-ResNet (width 128, rho 6: receptive field 95, 2.2 M parameters). Overrides: see RFResNetConfig."""
    return RFResNet(RFResNetConfig.from_dict(overrides))
