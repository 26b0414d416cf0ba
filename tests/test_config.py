"""Chain configs and search spaces: every YAML in tune_spaces/ parses and builds Tune distributions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mdlda.config import ConfigError, load_chain_config

SPACES = sorted((Path(__file__).parent.parent / "tune_spaces").glob("*.yaml"))


def test_the_spaces_the_docs_name_exist():
    names = {p.name for p in SPACES}
    root = Path(__file__).parent.parent
    named = set()
    for doc in [root / "README.md", root / "Makefile", *sorted((root / "docs").glob("*.md"))]:
        named |= set(re.findall(r"tune_spaces/([\w.-]+\.yaml)", doc.read_text()))
    assert {"demo.yaml", "teachers.yaml"} <= named  # the README's commands use both
    assert named <= names, f"docs name spaces that do not exist: {sorted(named - names)}"


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_space_parses_and_builds(path):
    from ray import tune

    from pipelines.teachers import param_space
    from pipelines.trial import split_trial_config

    cfg = load_chain_config(path)
    for sweep in [cfg.teachers, *cfg.baselines]:
        space = param_space(sweep)
        assert space["model"] == sweep.model
        # every entry resolves to a value a trial can use: sample one configuration and route it
        sample = {
            k: (
                v.sample()
                if isinstance(v, tune.search.sample.Domain)
                else v["grid_search"][0]
                if isinstance(v, dict) and "grid_search" in v
                else v
            )
            for k, v in space.items()
        }
        model, overrides, train_cfg, batch = split_trial_config(sample)
        assert train_cfg.mode == sweep.mode and batch["batch_size"] >= 2
        from mdlda.models import create_model

        create_model(model, **{**overrides, "width": 4})  # the overrides are real model options


def test_overrides_and_errors(tmp_path):
    demo = SPACES[0].parent / "demo.yaml"
    cfg = load_chain_config(demo, ["teachers.num_samples=3", "baselines.0.top_k=1"])
    assert cfg.teachers.num_samples == 3
    with pytest.raises(ConfigError, match="key=value"):
        load_chain_config(None, ["teachers.num_samples"])
    with pytest.raises(ConfigError, match="not an index"):
        load_chain_config(demo, ["baselines.9.top_k=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers:\n  num_sampels: 3\n")
    with pytest.raises(ConfigError, match="num_sampels"):
        load_chain_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_chain_config(tmp_path / "missing.yaml")


def test_unknown_distribution_is_named():
    from pipelines.spaces import SearchSpaceError, to_tune

    with pytest.raises(SearchSpaceError, match="lr.*logunifrom"):
        to_tune({"lr": {"logunifrom": [1e-4, 1e-3]}})
    with pytest.raises(SearchSpaceError, match="list of arguments"):
        to_tune({"lr": {"loguniform": 0.1}})
