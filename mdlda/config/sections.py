"""The sections of a chain config, each a strict pydantic model: :class:`ChainConfig` holds the data, the teacher
and baseline sweeps (:class:`SweepConfig`), the pseudo-labels and the student; :class:`TrialConfig` is what one
trial receives. :func:`identity` and :func:`config_digest` say whether a stage's stored outputs match a config.

A sweep's ``search`` maps a setting to a distribution (pipelines/spaces.py turns it into Ray Tune's); its keys
are TrainConfig fields (``lr``, ``adv_scale``, ``seed``, ``batch_size``, ...) or options of the sweep's model
(``width``, ``rho``, ...). A plain value there is a constant, as if it were fixed in ``train`` or
``model_overrides``. :mod:`mdlda.config.checks` holds what the sections check.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FieldSerializationInfo, field_serializer, model_validator

from mdlda.config.checks import Problems, check_mode, check_overrides, check_search
from mdlda.train_config import Float, Int, TrainConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _as_given(train: TrainConfig, info: FieldSerializationInfo) -> dict[str, Any]:
    """A section's ``train`` dumps the fields the config gives, not the defaults: the dump validates back to the
    same config (a searched key does not meet a default in ``train`` and clash), and the digests of stored
    sweeps and students see what a config chose."""
    return train.model_dump(mode=info.mode, exclude_unset=True)


class SweepConfig(_Strict):
    """A Ray Tune sweep of one model family (teachers, or a baseline when ``mode`` is 'supervised')."""

    name: str = Field("teachers", min_length=1)
    model: str = "rfresnet"
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="Fixed create_model overrides.")
    mode: Literal["dann", "supervised"] = "dann"
    search: dict[str, Any] = Field(default_factory=dict, description="Search space (see tune_spaces/README.md).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Fixed TrainConfig fields.")
    num_samples: Int = Field(16, ge=1)
    search_seed: Int | None = Field(
        None, ge=0, description="Seed of the search space sampling (the same seed draws the same trial configs)."
    )
    max_concurrent: Int | None = Field(None, ge=1, description="Concurrent trials; None sizes from the cluster.")
    cpus_per_trial: Float = Field(1.0, gt=0)
    gpus_per_trial: Float = Field(0.0, ge=0)
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: Int = Field(5, ge=1)
    reduction_factor: Int = Field(2, ge=2)
    metric: str = "valid_r_mean"
    mode_metric: Literal["max", "min"] = "max"
    top_k: Int = Field(4, ge=1)
    allow_fewer: bool = False
    select_cut: bool = Field(
        False,
        description="Also select trials the scheduler (ASHA) stopped early; by default only trials that "
        "trained out (max_epochs or patience) are compared.",
    )
    register_models: bool = True
    time_budget_s: Float | None = Field(
        None, ge=0, description="Stop launching trials after this many seconds of wall time (per command)."
    )
    max_trials: Int | None = Field(None, ge=0, description="Stop launching trials after this many in total.")
    max_failures_per_trial: Int = Field(0, ge=-1, description="Retries of a failed trial (-1: without limit).")

    train_as_given = field_serializer("train")(_as_given)

    @model_validator(mode="after")
    def _model_and_search(self) -> SweepConfig:
        problems = check_mode(self.train, self.mode)
        problems += check_overrides(self.model, self.model_overrides)
        if not problems:
            problems += check_search(self.search, self.train, self.model, self.model_overrides)
        if problems:
            raise Problems(problems)
        return self


class PseudoLabelConfig(_Strict):
    num_segments: Int | None = Field(500, ge=1)
    fraction: Float | None = Field(
        None, gt=0, description="Of the labelled source train size (may exceed 1); overrides num_segments."
    )
    seed: Int = Field(0, ge=0)
    batch_size: Int = Field(16, ge=1)
    concurrency: Int | None = Field(None, ge=1)
    cpus_per_actor: Float = Field(1.0, gt=0)
    gpus_per_actor: Float = Field(0.0, ge=0)
    splits: list[str] | None = Field(None, description="MAESTRO splits to draw from (default all).")


class StudentConfig(_Strict):
    model: str = "rfresnet"
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    train: TrainConfig = Field(default_factory=TrainConfig, description="TrainConfig fields (mode: distill).")
    mix: Literal["pooled", "paired"] = Field(
        "paired",
        description="pooled: one shuffled union of labelled and pseudo-labelled segments, each seen once an epoch "
        "(domain-pure batches); paired: every source batch paired with an equal pseudo-labelled batch.",
    )
    weighting: Literal["uniform", "spread"] = Field(
        "uniform",
        description="uniform: every pseudo-labelled segment weighs 1; spread: exp(-s^2), s the teachers' spread "
        "on it (std across teachers on the 1..10 scale, mean over features), so contested pseudo-labels count less.",
    )
    labels: Literal["calibrated", "raw"] = Field(
        "calibrated",
        description="Which teacher mean the pseudo-labels carry: calibrated (each teacher's registered output, "
        "shrunk to its validation fit) or raw (the teachers' outputs before that calibration).",
    )
    init: Literal["scratch", "teacher"] = Field(
        "scratch",
        description="scratch: the student starts from a fresh initialisation; teacher: from the weights of the "
        "best-ranked teacher that pseudo-labelled its segments (needs the same model and overrides).",
    )
    num_workers: Int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: Float = Field(1.0, gt=0)
    sync_batchnorm: bool = Field(
        False,
        description="With num_workers > 1 on GPUs: SyncBatchNorm, each domain's pass normalised over all ranks' "
        "segments of that domain (pipelines/student.py data_parallel says how it meets the per-domain passes); "
        "ignored on CPU workers.",
    )
    max_failures: Int = Field(1, ge=-1, description="Restarts of a failed worker group (-1: without limit).")
    register_models: bool = True
    champion: bool = Field(True, description="Move the registry's champion alias when this student beats it.")

    train_as_given = field_serializer("train")(_as_given)

    @model_validator(mode="after")
    def _model(self) -> StudentConfig:
        problems = check_mode(self.train, "distill") + check_overrides(self.model, self.model_overrides)
        if problems:
            raise Problems(problems)
        return self


class DataConfig(_Strict):
    """Where the raw datasets are (relative paths are resolved against the data root given on the CLI)."""

    midlevel_root: str = "midlevel"
    piano_ids: str | None = "midlevel/piano_ids.csv"
    maestro_root: str = "maestro"
    maestro_splits: list[str] | None = None
    max_performances: Int | None = Field(None, ge=1)
    seed: Int = Field(0, ge=0)
    eval_fraction: Float = Field(
        0.1, gt=0, lt=1, description="Mid-level: source share drawn for valid+test (reference 10%)."
    )
    valid_fraction: Float = Field(
        0.2, gt=0, lt=1, description="Mid-level: share of the evaluation set used for validation."
    )
    max_failure_share: Float = Field(0.1, ge=0, le=1)


class ChainConfig(_Strict):
    experiment: str = Field("mdlda", min_length=1)
    data: DataConfig = Field(default_factory=DataConfig)
    teachers: SweepConfig = Field(default_factory=SweepConfig)
    baselines: list[SweepConfig] = Field(default_factory=list)
    pseudolabel: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    materialize_share: Float = Field(
        0.5,
        ge=0,
        le=1,
        description="Hold the training datasets in the object store when they fit in this share of its free memory "
        "(decided when a training stage starts, source first; the decision and sizes are logged).",
    )
    band_floor: Float = Field(
        0.1,
        ge=0,
        description="Front end: bands whose training-set std is below this x the median band std are centred, not "
        "scaled (0 = only near-constant bands; see pipelines/data.py frontend_stats).",
    )

    @model_validator(mode="after")
    def _names_unique(self) -> ChainConfig:
        names = [self.teachers.name] + [b.name for b in self.baselines]
        if len(set(names)) != len(names):
            raise ValueError(f"sweep names must be unique, got {names}")
        return self


class TrialConfig(_Strict):
    """What one trial (or the student's Ray Train run) receives: Tune hands it over as the nested dict
    ``{"model": name, "model_overrides": {...}, "train": {...}}``, the searched values already drawn."""

    model: str = "rfresnet"
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    train: TrainConfig = Field(default_factory=TrainConfig)

    def params(self) -> dict[str, Any]:
        """The flat MLflow params of the trial: the model name, its overrides and the train fields it set."""
        return {"model": self.model, **self.model_overrides, **self.train.model_dump(mode="json", exclude_unset=True)}


# Settings that bound how much of a sweep runs, not what a trial does: a budget change resumes the same sweep.
BUDGET_KEYS = ("time_budget_s", "max_trials")


def identity(cfg: ChainConfig | SweepConfig) -> dict:
    """The config as it decides results (budgets left out), the input of the chain and sweep digests."""

    def sweep(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in BUDGET_KEYS}

    d = cfg.model_dump(mode="json")
    if isinstance(cfg, SweepConfig):
        return sweep(d)
    return {**d, "teachers": sweep(d["teachers"]), "baselines": [sweep(b) for b in d["baselines"]]}


def config_digest(obj: Any) -> str:
    """A short stable digest of a JSON-able config (used to tell whether a stage's outputs match)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
