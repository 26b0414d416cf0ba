"""VGG-ish: the plain CNN of the first mid-level feature models, the baseline RF-ResNet is compared against.

After Chowdhury, Vall, Haunschmid & Widmer (2019), "Towards explainable music emotion recognition: the route
via mid-level features": a VGG-style stack of conv-BN-ReLU layers with max-pooling and dropout, global average
pooling and a linear head. The layout here is ours, sized like RF-ResNet in compute (about 3.8 M parameters,
8.0 GFLOP per forward vs 12.3 for RF-ResNet at width 128), not a layer-exact copy of the paper's table:

    conv5x5/2 64 - conv 64 - pool - conv 128 - conv 128 - pool - conv 256 - conv 256 - conv 384 - pool
    - conv 512 - global average pool - linear 512 -> 7   (channels at width 128; dropout after each pool)

Shapes at width 128 for a 15-s segment: (B, 1, 149, 469) -> stem (B, 64, 75, 235) -> pool (B, 128, 37, 117)
-> pool (B, 256, 18, 58) -> pool (B, 512, 9, 29) -> (B, 512) -> (B, 7).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from mdlda.frontend import FrontendConfig
from mdlda.models.base import LABEL_CENTRE, AudioModel, ModelConfig, check_positive_int, init_weights
from mdlda.models.registry import register_model

# (channels in units of width / 2, kernel, stride, max-pool + dropout after)
LAYERS: tuple[tuple[int, int, int, bool], ...] = (
    (1, 5, 2, False),
    (1, 3, 1, True),
    (2, 3, 1, False),
    (2, 3, 1, True),
    (4, 3, 1, False),
    (4, 3, 1, False),
    (6, 3, 1, True),
    (8, 3, 1, False),
)


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    """Conv (no bias, 'same'-style padding kernel // 2) -> BN -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


@dataclass(frozen=True)
class VGGishConfig(ModelConfig):
    """``width`` (even): channels width/2 .. 4 width, embed_dim = 4 width; ``dropout`` after each pool."""

    name = "vggish"
    width: int = 128
    dropout: float = 0.3
    num_outputs: int = 7
    frontend: FrontendConfig = field(default_factory=FrontendConfig)

    def __post_init__(self) -> None:
        check_positive_int(width=self.width, num_outputs=self.num_outputs)
        if self.width % 2:
            raise ValueError(f"vggish width must be even (its first layers have width / 2 channels), got {self.width}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class VGGish(AudioModel):
    """Front end + VGG-ish CNN; ``forward(audio (B, N)) -> (B, num_outputs)``. See the module docstring."""

    def __init__(self, config: VGGishConfig | None = None) -> None:
        config = config if config is not None else VGGishConfig()
        super().__init__(config)
        unit = config.width // 2
        layers: list[nn.Module] = []
        in_channels = 1
        for mult, kernel, stride, pool in LAYERS:
            layers.append(conv_bn_relu(in_channels, mult * unit, kernel, stride))
            if pool:
                layers += [nn.MaxPool2d(2), nn.Dropout(config.dropout)]
            in_channels = mult * unit
        self.body = nn.Sequential(*layers)
        self.embed_dim = in_channels  # 8 * (width / 2) = 4 width
        self.head = nn.Linear(self.embed_dim, config.num_outputs)
        self.apply(init_weights)
        nn.init.normal_(self.head.weight, std=0.01)  # small start: predictions begin near the label centre
        nn.init.constant_(self.head.bias, LABEL_CENTRE)

    def forward_maps(self, spec: Tensor) -> Tensor:
        """(B, 1, 149, T) spectrogram -> (B, 4 width, 9, 29) last conv map (for T = 469)."""
        return self.body(spec)

    def features_from_spectrogram(self, spec: Tensor) -> Tensor:
        return self.forward_maps(spec).mean(dim=(2, 3))  # (B, 4w) global average pool

    def regress(self, features: Tensor) -> Tensor:
        return self.head(features)  # (B, 4w) -> (B, num_outputs)


@register_model
def vggish(**overrides) -> VGGish:
    """VGG-ish baseline (width 128: 64..512 channels, 3.8 M parameters). Overrides: see VGGishConfig."""
    return VGGish(VGGishConfig.from_dict(overrides))
