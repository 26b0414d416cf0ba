"""Search spaces are data: the ``search:`` mapping of a YAML file -> Ray Tune distributions.

Each entry is a plain value (a constant) or a one-key mapping naming the distribution::

    lr: {loguniform: [1.0e-4, 3.0e-3]}
    width: {choice: [64, 128]}
    seed: {randint: [0, 100000]}
    adv_scale: {grid: [0.3, 1.0]}

``mdlda.config`` checks every entry when the YAML loads (the key is a searchable setting, the distribution and
its arguments are valid for it); :func:`to_tune` only converts.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from mdlda.config import DISTRIBUTIONS

_TUNE = {
    "uniform": lambda a: tune.uniform(*a),
    "loguniform": lambda a: tune.loguniform(*a),
    "quniform": lambda a: tune.quniform(*a),
    "randint": lambda a: tune.randint(*a),
    "choice": lambda a: tune.choice(list(a)),
    "grid": lambda a: tune.grid_search(list(a)),
}
assert set(_TUNE) == set(DISTRIBUTIONS)


class SearchSpaceError(ValueError):
    """A search-space entry names an unknown distribution or has the wrong arguments."""


def to_tune(search: dict[str, Any], where: str = "search") -> dict[str, Any]:
    """Convert a YAML ``search`` mapping into Tune distributions (plain values stay constants)."""
    space: dict[str, Any] = {}
    for key, spec in search.items():
        if isinstance(spec, dict):
            if len(spec) != 1:
                raise SearchSpaceError(f"{where}.{key}: expected one distribution, got {sorted(spec)}")
            ((kind, args),) = spec.items()
            if kind not in _TUNE:
                raise SearchSpaceError(f"{where}.{key}: unknown distribution {kind!r}; use one of {sorted(_TUNE)}")
            if not isinstance(args, list | tuple) or not args:
                raise SearchSpaceError(f"{where}.{key}: {kind} needs a list of arguments, got {args!r}")
            try:
                space[key] = _TUNE[kind](args)
            except (TypeError, ValueError) as exc:
                raise SearchSpaceError(f"{where}.{key}: bad arguments for {kind}: {args!r} ({exc})") from exc
        else:
            space[key] = spec
    return space


def grid_size(space: Any) -> int:
    """How many configurations the grid searches of a (nested) param_space multiply into, per sample."""
    if isinstance(space, dict):
        if "grid_search" in space and len(space) == 1:
            return len(space["grid_search"])
        n = 1
        for value in space.values():
            n *= grid_size(value)
        return n
    return 1
