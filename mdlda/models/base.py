"""What every mdlda model shares: a config mixin (dict round-trip) and the audio-in / 7-features-out wrapper.

A model is ``Frontend`` (audio -> standardised spectrogram) followed by a network. The split follows timm:

- ``forward_features(audio (B, N)) -> (B, embed_dim)``: the pooled embedding phi that DANN feeds to both the
  regression head and (through gradient reversal) the domain head, and that the discrepancy metric reads;
- ``forward_head(features (B, embed_dim)) -> (B, num_outputs)``: the regressor (a subclass's ``regress``), on the
  0..1 label scale (ratings / ``mdlda.params.LABEL_SCALE``; no squashing, the targets are 0.1..1.0), followed by
  the output calibration (``output_scale * raw + output_shift``, identity until
  :func:`mdlda.training.fit` sets it: :mod:`mdlda.calibration`);
- ``forward(audio) = forward_head(forward_features(audio))``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

import torch
from torch import Tensor, nn

from mdlda.frontend import Frontend, FrontendConfig

# Ratings 1..10 become 0.1..1.0; the regression head's bias starts mid-scale so the first steps fit the shape
# of the data, not its offset.
LABEL_CENTRE = 0.5


class ModelConfig:
    """Mixin for a model's (frozen) config dataclass with a ``frontend: FrontendConfig`` field.

    ``to_dict()`` gives plain JSON-friendly values, the registry ``name`` first and the front end nested as a
    dict, so ``create_model(**config.to_dict())`` rebuilds the model. ``from_dict`` is also the override
    mechanism: missing keys take defaults, a partial ``frontend`` dict is completed with front-end defaults,
    unknown keys are an error naming the known ones.
    """

    name: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, FrontendConfig) else value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        d = dict(d)
        name = d.pop("name", cls.name)
        if name != cls.name:
            raise ValueError(f"config is for model {name!r}, not {cls.name!r}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for model {cls.name!r}; known options: {sorted(known)}")
        frontend = d.get("frontend")
        if isinstance(frontend, dict):
            d["frontend"] = FrontendConfig.from_dict(frontend)
        elif frontend is not None and not isinstance(frontend, FrontendConfig):
            raise TypeError(f"frontend must be a dict or FrontendConfig, got {type(frontend).__name__}")
        return cls(**d)


def check_positive_int(**values: Any) -> None:
    """Raise ValueError naming any value that is not a positive int (for config ``__post_init__``)."""
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")


class AudioModel(nn.Module):
    """Front end + network; subclasses set ``embed_dim`` and define the two methods that raise here."""

    config: ModelConfig
    embed_dim: int

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.frontend = Frontend(config.frontend)
        n = config.num_outputs
        self.register_buffer("output_scale", torch.ones(n))
        self.register_buffer("output_shift", torch.zeros(n))
        self.register_load_state_dict_pre_hook(_identity_calibration_if_missing)

    def features_from_spectrogram(self, spec: Tensor) -> Tensor:
        """(B, 1, F, T) standardised spectrogram -> (B, embed_dim) pooled embedding."""
        raise NotImplementedError

    def regress(self, features: Tensor) -> Tensor:
        """(B, embed_dim) -> (B, num_outputs) raw regression outputs on the 0..1 label scale."""
        raise NotImplementedError

    def forward_head(self, features: Tensor) -> Tensor:
        """(B, embed_dim) -> (B, num_outputs) calibrated outputs on the 0..1 label scale."""
        return self.regress(features) * self.output_scale + self.output_shift

    def set_output_calibration(self, slope: float, shift) -> None:
        """Calibrated = ``slope * raw + shift`` (``shift``: one value per output, 0..1 label scale)."""
        self.output_scale.fill_(float(slope))
        self.output_shift.copy_(torch.as_tensor(shift, dtype=self.output_shift.dtype))

    def reset_output_calibration(self) -> None:
        """Back to the raw outputs (what training learns on)."""
        self.set_output_calibration(1.0, torch.zeros_like(self.output_shift))

    def forward_features(self, audio: Tensor) -> Tensor:
        """(B, N) float or int16 audio -> (B, embed_dim) pooled embedding."""
        spec = self.frontend(audio)  # (B, 1, 149, T); T = 469 for 15 s
        return self.features_from_spectrogram(spec)  # (B, embed_dim)

    def forward(self, audio: Tensor) -> Tensor:
        """(B, N) audio -> (B, num_outputs) predicted mid-level features (ratings / 10)."""
        return self.forward_head(self.forward_features(audio))


def _identity_calibration_if_missing(module, state_dict, prefix, *args) -> None:
    """A state dict saved before models carried an output calibration loads with the identity map."""
    if prefix + "output_scale" not in state_dict:
        state_dict[prefix + "output_scale"] = torch.ones_like(module.output_scale)
        state_dict[prefix + "output_shift"] = torch.zeros_like(module.output_shift)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan-in, ReLU) conv/linear weights, zero biases, identity BN; for ``module.apply``."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
