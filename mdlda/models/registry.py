"""Named model variants behind one factory (timm-style): ``@register_model`` and ``create_model(name,
**overrides)``.

A registered builder takes keyword overrides of its config and returns the model. The registry is filled when
``mdlda.models`` imports the model files (registration is the only thing those imports do).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(fn: F) -> F:
    """Register ``fn(**overrides) -> nn.Module`` under ``fn.__name__`` (a name can be registered once)."""
    name = fn.__name__
    if name in _BUILDERS and _BUILDERS[name] is not fn:
        raise ValueError(f"a model named {name!r} is already registered")
    _BUILDERS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_BUILDERS)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model ``name`` with config ``overrides`` (e.g. ``width=16``, ``frontend={...}``).

    ``create_model(**model.config.to_dict())`` rebuilds a model from its logged config. Unknown names and
    unknown overrides raise ValueError naming the known ones.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {list_models()}")
    return _BUILDERS[name](**overrides)
