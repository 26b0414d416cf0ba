"""Reading a chain config: the YAML file, the ``--set`` overrides, and errors that name the file and key path.

``load_chain_config(path, overrides=["teachers.num_samples=8", ...])`` applies dotted ``key=value`` pairs (values
parsed as YAML) on top of the file before validation. A key the file gives twice is an error (PyYAML would keep
the last one); so is every problem the sections find (:mod:`mdlda.config.sections`), all named at once on one
line with their key paths, and an unknown key with the keys its section knows.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mdlda.config.checks import Problems
from mdlda.config.sections import ChainConfig


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
