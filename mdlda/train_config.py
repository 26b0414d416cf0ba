"""How one training run trains: :class:`TrainConfig`, validated by pydantic, and the number types every config uses.

A YAML file may say ``no`` or ``off`` where it means 0; YAML 1.1 reads those as booleans, and pydantic's lax
int/float would quietly turn them into 0 or 1. :data:`Int` and :data:`Float` refuse booleans and keep the rest of
pydantic's coercion ("3" -> 3, 3 -> 3.0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {value!r} (YAML reads yes/no/on/off as booleans)")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]


class TrainConfig(BaseModel):
    """Everything :func:`mdlda.training.fit` needs besides the model and the data, plus the batch sizes the
    callers' batch iterators read. Override with ``model_copy(update=...)`` or :meth:`from_dict`;
    :meth:`to_dict` is the JSON-friendly form logged with every run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["supervised", "dann", "distill"] = "supervised"
    lr: Float = Field(1e-3, gt=0)
    weight_decay: Float = Field(1e-5, ge=0, description="Adam's L2 weight decay.")
    lr_milestones: tuple[Annotated[Int, Field(ge=0)], ...] = Field(
        (2, 5, 10, 15, 20), description="After these epochs the lr is multiplied by lr_gamma."
    )
    lr_gamma: Float = Field(0.5, gt=0, le=1)
    max_epochs: Int = Field(99, ge=1)
    patience: Int = Field(14, ge=1, description="Stop after this many epochs without a better validation number.")
    adv_scale: Float = Field(
        1.0, ge=0, description="DANN: scale of the gradient-reversal weight schedule (mdlda.adapt.dann_lambda)."
    )
    lambda_schedule_epochs: Int = Field(20, ge=1, description="DANN: epochs the reversal weight ramps up over.")
    lambda_gamma: Float = Field(10.0, description="DANN: steepness of Ganin's ramp.")
    seed: Int = Field(0, ge=0)
    device: str = Field("auto", description="'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when available).")
    # GPU settings: off or a no-op on a CPU by default, so the CPU path is unchanged (tests/test_training.py)
    mixed_precision: bool = Field(False, description="Autocast of the network (front end stays fp32) on CUDA.")
    amp_dtype: Literal["bfloat16", "float16"] = Field("bfloat16", description="float16 adds a GradScaler.")
    mixed_precision_cpu: bool = Field(False, description="Also autocast (bf16) on a CPU: only worth it with AMX.")
    channels_last: bool = Field(False, description="NHWC weights and feature maps (what tensor cores want).")
    compile: bool = Field(False, description="torch.compile each network block; the first steps pay for it.")
    pin_memory: bool = Field(True, description="CUDA: host -> device copies from page-locked memory.")
    grad_clip_norm: Float | None = Field(None, gt=0, description="Clip the global gradient norm to this value.")
    deterministic: bool = Field(True, description="torch.use_deterministic_algorithms(True, warn_only=True).")
    # DANN / distillation: whose passes update the BatchNorm running statistics the model is evaluated and
    # served with (docs/method.md has the measurements)
    bn_stats: Literal["both", "source", "target"] = "source"
    # which validation number picks the best epoch (and drives patience): "r_mean" (scale-free) or "loss" (the
    # MSE, which also sees an offset or a wrong output scale)
    select_on: Literal["r_mean", "loss"] = "r_mean"
    # the kept epoch's outputs mapped onto the rating scale by an affine map fitted on its validation outputs
    # (one shared slope <= 1, a shift per feature; every r unchanged): mdlda.calibration
    calibrate: Literal["affine", "none"] = "affine"
    # read by the batch iterators of the trial and the student, not by fit; a training batch of one segment
    # would leave BatchNorm without a variance
    batch_size: Int = Field(8, ge=2, description="Training segments per batch (per domain).")
    shuffle_buffer: Int = Field(64, ge=0, description="Local shuffle buffer of the training batch iterator.")
    valid_batch_size: Int = Field(16, ge=1)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not (v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())):
            raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {v!r}")
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a (partial) dict; unknown keys are an error naming the known ones."""
        unknown = sorted(set(d) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"unknown TrainConfig option(s) {unknown}; known: {sorted(cls.model_fields)}")
        return cls.model_validate(dict(d))


def searchable_train_keys() -> set[str]:
    """The TrainConfig fields a sweep may search (the mode is the sweep's own)."""
    return set(TrainConfig.model_fields) - {"mode"}
