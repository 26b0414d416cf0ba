"""Typed configuration of the chain and its stages, read from the YAML files in ``tune_spaces/``.

One override mechanism: ``load_chain_config(path, overrides=["teachers.num_samples=8", ...])`` applies dotted
``key=value`` pairs (values parsed as YAML) on top of the file before validation. Everything is checked when the
file loads, before Ray starts: unknown keys, duplicated keys, booleans where a number belongs, sizes out of
bounds, ``model_overrides`` the model does not have, and ``search`` entries that are not a distribution of a
searchable setting. Every error names the file, the key path and what is allowed. The trial receives a
:class:`TrialConfig`.

Three modules, imported from here: :mod:`~mdlda.config.sections` (the section models and the digests),
:mod:`~mdlda.config.checks` (what a section checks in its ``model_overrides`` and ``search``) and
:mod:`~mdlda.config.loading` (the YAML file, the overrides, the error messages).
"""

from mdlda.config.checks import DISTRIBUTIONS, Problems, model_options, search_target
from mdlda.config.loading import ConfigError, load_chain_config, load_yaml
from mdlda.config.sections import (
    BUDGET_KEYS,
    ChainConfig,
    DataConfig,
    PseudoLabelConfig,
    StudentConfig,
    SweepConfig,
    TrialConfig,
    config_digest,
    identity,
)

__all__ = [
    "BUDGET_KEYS",
    "DISTRIBUTIONS",
    "ChainConfig",
    "ConfigError",
    "DataConfig",
    "Problems",
    "PseudoLabelConfig",
    "StudentConfig",
    "SweepConfig",
    "TrialConfig",
    "config_digest",
    "identity",
    "load_chain_config",
    "load_yaml",
    "model_options",
    "search_target",
]
