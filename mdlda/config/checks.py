"""The checks a sweep or student section runs on itself when it validates: ``model_overrides`` against the
model's own config, and every ``search`` entry against the distributions below and the setting it searches.

Each check returns ``(key path below the section, message)`` pairs; a section raises them together as
:class:`Problems`, and :func:`mdlda.config.loading.load_chain_config` names every one with its full key path.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

from pydantic import ValidationError

from mdlda.train_config import TrainConfig, searchable_train_keys

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
    return sorted(f.name for f in dataclasses.fields(model_config_class(name)))


def check_overrides(model: str, overrides: dict[str, Any], where: str = "model_overrides") -> list[tuple[str, str]]:
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


def check_search(
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
                found = check_overrides(model, {**overrides, key: value})
                if found:
                    problems.append((where, f"{value!r} is not a valid {key}: {found[0][1]}"))
                    break
    return problems


def check_mode(train: TrainConfig, mode: str) -> list[tuple[str, str]]:
    if "mode" in train.model_fields_set and train.mode != mode:
        return [("train.mode", f"is {train.mode!r}, but this section trains in mode {mode!r}: leave it out")]
    return []
