"""Search spaces are data: the ``search:`` mapping of a YAML file -> Ray Tune distributions.

Each entry is a plain value (fixed) or a one-key mapping naming the distribution::

    lr: {loguniform: [1.0e-4, 3.0e-3]}
    width: {choice: [64, 128]}
    seed: {randint: [0, 100000]}
    adv_scale: {grid: [0.3, 1.0]}
"""

from __future__ import annotations

from typing import Any

from ray import tune

_DISTRIBUTIONS = {
    "uniform": lambda a: tune.uniform(*a),
    "loguniform": lambda a: tune.loguniform(*a),
    "quniform": lambda a: tune.quniform(*a),
    "randint": lambda a: tune.randint(*a),
    "choice": lambda a: tune.choice(list(a)),
    "grid": lambda a: tune.grid_search(list(a)),
}


class SearchSpaceError(ValueError):
    """A search-space entry names an unknown distribution or has the wrong arguments."""


def to_tune(search: dict[str, Any], where: str = "search") -> dict[str, Any]:
    """Convert a YAML ``search`` mapping into a Tune ``param_space``."""
    space: dict[str, Any] = {}
    for key, spec in search.items():
        if isinstance(spec, dict):
            if len(spec) != 1:
                raise SearchSpaceError(f"{where}.{key}: expected one distribution, got {sorted(spec)}")
            ((kind, args),) = spec.items()
            if kind not in _DISTRIBUTIONS:
                raise SearchSpaceError(
                    f"{where}.{key}: unknown distribution {kind!r}; use one of {sorted(_DISTRIBUTIONS)}"
                )
            if not isinstance(args, list | tuple) or not args:
                raise SearchSpaceError(f"{where}.{key}: {kind} needs a list of arguments, got {args!r}")
            try:
                space[key] = _DISTRIBUTIONS[kind](args)
            except (TypeError, ValueError) as exc:
                raise SearchSpaceError(f"{where}.{key}: bad arguments for {kind}: {args!r} ({exc})") from exc
        else:
            space[key] = spec
    return space
