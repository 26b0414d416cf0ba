"""Typed configuration of the chain and its stages, read from the YAML files in ``tune_spaces/``.

One override mechanism: ``load_chain_config(path, overrides=["teachers.num_samples=8", ...])`` applies dotted
``key=value`` pairs (values parsed as YAML) on top of the file before validation. Unknown keys are errors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SweepConfig(_Strict):
    """A Ray Tune sweep of one model family (teachers, or a baseline when ``mode`` is 'supervised')."""

    name: str = "teachers"
    model: str = "rfresnet"
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="Fixed create_model overrides.")
    mode: Literal["dann", "supervised"] = "dann"
    search: dict[str, Any] = Field(default_factory=dict, description="Search space (see tune_spaces/README).")
    train: dict[str, Any] = Field(default_factory=dict, description="Fixed TrainConfig fields.")
    num_samples: int = 16
    search_seed: int | None = Field(
        None, description="Seed of the search space sampling (the same seed draws the same trial configs)."
    )
    max_concurrent: int | None = Field(None, description="Concurrent trials; None sizes from the cluster.")
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 5
    reduction_factor: int = 2
    metric: str = "valid_r_mean"
    mode_metric: Literal["max", "min"] = "max"
    top_k: int = 4
    allow_fewer: bool = False
    select_cut: bool = Field(
        False,
        description="Also select trials the scheduler (ASHA) stopped early; by default only trials that "
        "trained out (max_epochs or patience) are compared.",
    )
    register_models: bool = True
    time_budget_s: float | None = Field(
        None, ge=0, description="Stop launching trials after this many seconds of wall time (per command)."
    )
    max_trials: int | None = Field(None, ge=0, description="Stop launching trials after this many in total.")
    max_failures_per_trial: int = 0


class PseudoLabelConfig(_Strict):
    num_segments: int | None = 500
    fraction: float | None = Field(None, description="Of the labelled source train size; overrides num_segments.")
    seed: int = 0
    batch_size: int = 16
    concurrency: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    splits: list[str] | None = Field(None, description="MAESTRO splits to draw from (default all).")


class StudentConfig(_Strict):
    model: str = "rfresnet"
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
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
    init: Literal["scratch", "teacher"] = Field(
        "scratch",
        description="scratch: the student starts from a fresh initialisation; teacher: from the weights of the "
        "best-ranked teacher that pseudo-labelled its segments (needs the same model and overrides).",
    )
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    sync_batchnorm: bool = Field(
        False,
        description="With num_workers > 1 on GPUs: SyncBatchNorm, each domain's pass normalised over all ranks' "
        "segments of that domain (pipelines/student.py data_parallel says how it meets the per-domain passes); "
        "ignored on CPU workers.",
    )
    max_failures: int = 1
    register_models: bool = True
    champion: bool = Field(True, description="Move the registry's champion alias when this student beats it.")


class DataConfig(_Strict):
    """Where the raw datasets are (relative paths are resolved against the data root given on the CLI)."""

    midlevel_root: str = "midlevel"
    piano_ids: str | None = "midlevel/piano_ids.csv"
    maestro_root: str = "maestro"
    maestro_splits: list[str] | None = None
    max_performances: int | None = None
    seed: int = 0
    eval_fraction: float = Field(0.1, description="Mid-level: source share drawn for valid+test (reference 10%).")
    valid_fraction: float = Field(0.2, description="Mid-level: share of the evaluation set used for validation.")
    max_failure_share: float = 0.1


class ChainConfig(_Strict):
    experiment: str = "mdlda"
    data: DataConfig = Field(default_factory=DataConfig)
    teachers: SweepConfig = Field(default_factory=SweepConfig)
    baselines: list[SweepConfig] = Field(default_factory=list)
    pseudolabel: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    materialize_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Hold the training datasets in the object store when they fit in this share of its free memory "
        "(decided when a training stage starts, source first; the decision and sizes are logged).",
    )
    band_floor: float = Field(
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


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the file and the key."""


def _set_dotted(d: dict, key: str, value: Any) -> None:
    """``a.b.c=v``; a number indexes a list (``baselines.0.num_samples=2``)."""
    parts = key.split(".")
    node: Any = d
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"override {key!r}: {p!r} is not an index of a {len(node)}-item list")
            if last:
                node[int(p)] = value
            else:
                node = node[int(p)]
        elif isinstance(node, dict):
            if last:
                node[p] = value
            else:
                node = node.setdefault(p, {})
        else:
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:i])!r} is not a section")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at} ({what})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_chain_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ChainConfig:
    """Read a chain config (default: all defaults) and apply ``key=value`` overrides."""
    data = load_yaml(path) if path else {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. teachers.num_samples=8")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    try:
        return ChainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path or 'config'}: {_one_line(exc)}") from exc


def _one_line(exc: ValidationError) -> str:
    """Every problem of a validation error on one line, each naming its key: ``teachers.num_sample: Extra
    inputs are not permitted (got 2)``."""
    parts = []
    for e in exc.errors():
        key = ".".join(str(k) for k in e["loc"]) or "config"
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
        parts.append(f"{key}: {e['msg']}{got}")
    return f"{len(parts)} problem(s): " + "; ".join(parts)


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
