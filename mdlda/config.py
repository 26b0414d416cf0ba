"""Typed configuration of the chain and its stages, read from the YAML files in ``tune_spaces/``.

One override mechanism: ``load_chain_config(path, overrides=["teachers.num_samples=8", ...])`` applies dotted
``key=value`` pairs (values parsed as YAML) on top of the file before validation. Everything is checked when the
file loads, before Ray starts: unknown keys, duplicated keys, booleans where a number belongs, sizes out of
bounds, ``model_overrides`` the model does not have, and ``search`` entries that are not a distribution of a
searchable setting. Every error names the file, the key path and what is allowed.

A sweep's ``search`` maps a setting to a distribution (pipelines/spaces.py turns it into Ray Tune's); its keys
are TrainConfig fields (``lr``, ``adv_scale``, ``seed``, ``batch_size``, ...) or options of the sweep's model
(``width``, ``rho``, ...). A plain value there is a constant, as if it were fixed in ``train`` or
``model_overrides``. The trial receives a :class:`TrialConfig`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FieldSerializationInfo,
    ValidationError,
    field_serializer,
    model_validator,
)

from mdlda.train_config import Float, Int, TrainConfig, searchable_train_keys

# distribution -> (least, most) number of arguments; numeric: the arguments are bounds, not values
DISTRIBUTIONS: dict[str, tuple[int, int | None]] = {
    "uniform": (2, 2),
    "loguniform": (2, 2),
    "quniform": (3, 3),
    "randint": (2, 2),
    "choice": (1, None),
    "grid": (1, None),
}
NUMERIC_DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _as_given(train: TrainConfig, info: FieldSerializationInfo) -> dict[str, Any]:
    """A section's ``train`` dumps the fields the config gives, not the defaults: the dump validates back to the
    same config (a searched key does not meet a default in ``train`` and clash), and the digests of stored
    sweeps and students see what a config chose."""
    return train.model_dump(mode=info.mode, exclude_unset=True)


class Problems(ValueError):
    """Problems a validator found, each ``(key path below the validated section, message)``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{k}: {m}" for k, m in problems))
        self.problems = problems


@functools.cache
def model_config_class(name: str) -> type:
    """The config dataclass of the registered model ``name`` (what ``model_overrides`` must fit)."""
    from mdlda.models import create_model, list_models

    if name not in list_models():
        raise Problems([("model", f"unknown model {name!r}; known models: {list_models()}")])
    return type(create_model(name).config)


def model_options(name: str) -> list[str]:
    import dataclasses

    return sorted(f.name for f in dataclasses.fields(model_config_class(name)))


def _check_overrides(model: str, overrides: dict[str, Any], where: str = "model_overrides") -> list[tuple[str, str]]:
    cls = model_config_class(model)
    known = model_options(model)
    unknown = [k for k in overrides if k not in known or k == "name"]
    if unknown:
        return [(f"{where}.{k}", f"not an option of model {model!r}; options: {known}") for k in unknown]
    try:
        cls.from_dict(overrides)
    except (TypeError, ValueError) as exc:
        return [(where, str(exc))]
    return []


def search_target(key: str) -> Literal["train", "model_overrides"]:
    """Where a (load-checked) searched key goes in the trial config."""
    return "train" if key in searchable_train_keys() else "model_overrides"


def _candidates(key: str, spec: Any) -> tuple[list[Any], str | None]:
    """The values a search entry can produce, for checking them (bounds stand in for ranges), or an error."""
    if not isinstance(spec, dict):
        return [spec], None
    if len(spec) != 1:
        return [], f"expected one distribution, got {sorted(spec)}"
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        return [], f"unknown distribution {kind!r}; use one of {sorted(DISTRIBUTIONS)} or a plain value"
    least, most = DISTRIBUTIONS[kind]
    if not isinstance(args, list | tuple) or len(args) < least or (most is not None and len(args) > most):
        n = f"{least}" if least == most else f"at least {least}"
        return [], f"{kind} needs a list of {n} argument(s), got {args!r}"
    if kind in NUMERIC_DISTRIBUTIONS:
        if not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
            return [], f"{kind} needs numbers, got {args!r} (YAML reads 1e-3 as text: write 1.0e-3)"
        if not args[0] < args[1]:
            return [], f"{kind} needs lower < upper, got {args!r}"
        if kind == "loguniform" and args[0] <= 0:
            return [], f"loguniform needs a lower bound > 0, got {args!r}"
        return [args[0], args[1] - 1 if kind == "randint" else args[1]], None
    return list(args), None


def _check_search(
    search: dict[str, Any], train: TrainConfig, model: str, overrides: dict[str, Any]
) -> list[tuple[str, str]]:
    problems = []
    train_keys, model_keys = searchable_train_keys(), set(model_options(model)) - {"name"}
    fixed_train = train.model_dump(exclude_unset=True)
    for key, spec in search.items():
        where = f"search.{key}"
        if key == "mode":
            problems.append((where, "the sweep's own mode decides it, it cannot be searched"))
            continue
        if key not in train_keys | model_keys:
            problems.append(
                (
                    where,
                    f"not a searchable setting; searchable: the TrainConfig fields {sorted(train_keys)} and the "
                    f"options of model {model!r} {sorted(model_keys)}",
                )
            )
            continue
        fixed_in = "train" if key in fixed_train else "model_overrides" if key in overrides else None
        if fixed_in:
            problems.append((where, f"also fixed in {fixed_in}.{key}: fix it or search it"))
            continue
        values, error = _candidates(key, spec)
        if error:
            problems.append((where, error))
            continue
        for value in values:
            if key in train_keys:
                try:
                    TrainConfig.model_validate({**fixed_train, key: value})
                except ValidationError as exc:
                    msg = "; ".join(e["msg"] for e in exc.errors())
                    problems.append((where, f"{value!r} is not a valid {key}: {msg}"))
                    break
            else:
                found = _check_overrides(model, {**overrides, key: value})
                if found:
                    problems.append((where, f"{value!r} is not a valid {key}: {found[0][1]}"))
                    break
    return problems


def _check_mode(train: TrainConfig, mode: str) -> list[tuple[str, str]]:
    if "mode" in train.model_fields_set and train.mode != mode:
        return [("train.mode", f"is {train.mode!r}, but this section trains in mode {mode!r}: leave it out")]
    return []


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
        problems = _check_mode(self.train, self.mode)
        problems += _check_overrides(self.model, self.model_overrides)
        if not problems:
            problems += _check_search(self.search, self.train, self.model, self.model_overrides)
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
        problems = _check_mode(self.train, "distill") + _check_overrides(self.model, self.model_overrides)
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


def _duplicate_keys(node: yaml.Node, path: str = "") -> list[str]:
    """Every key a YAML mapping gives twice (PyYAML would keep the last one silently), as ``path (lines)``."""
    found = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            sub = f"{path}.{key}" if path else str(key)
            if key is not None and key in seen:
                found.append(f"{sub} (lines {seen[key] + 1} and {key_node.start_mark.line + 1})")
            elif key is not None:
                seen[key] = key_node.start_mark.line
            found += _duplicate_keys(value_node, sub)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicate_keys(item, f"{path}.{i}" if path else str(i))
    return found


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        dups = _duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at} ({what})") from exc
    if dups:
        raise ConfigError(f"{path}: duplicate key(s) {', '.join(dups)}; give each key once")
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


def _section_model(loc: tuple) -> type[BaseModel] | None:
    """The config model of the section at ``loc`` (list indices skipped), for naming its known keys."""
    model: type[BaseModel] = ChainConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        found = _model_in(field.annotation)
        if found is None:
            return None
        model = found
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _one_line(exc: ValidationError) -> str:
    """Every problem of a validation error on one line, each naming its key: ``teachers.num_sample: Extra
    inputs are not permitted (got 2); known keys: [...]``."""
    parts = []
    for e in exc.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(k) for k in loc) or "config"
        error = (e.get("ctx") or {}).get("error")
        if isinstance(error, Problems):
            parts += [f"{key}.{sub}: {msg}" if key != "config" else f"{sub}: {msg}" for sub, msg in error.problems]
            continue
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
        known = ""
        if e["type"] == "extra_forbidden":
            section = _section_model(loc[:-1])
            if section is not None:
                known = f"; known keys: {sorted(section.model_fields)}"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{key}: {msg}{got}{known}")
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
