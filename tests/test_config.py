"""Chain configs and search spaces: every YAML in tune_spaces/ loads and builds the trials' configs, and every
malformed file fails at load with the file, the key path and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mdlda.config import ChainConfig, ConfigError, TrialConfig, load_chain_config

SPACES = sorted((Path(__file__).parent.parent / "tune_spaces").glob("*.yaml"))


def test_the_spaces_the_docs_name_exist():
    names = {p.name for p in SPACES}
    root = Path(__file__).parent.parent
    named = set()
    for doc in [root / "README.md", root / "Makefile", *sorted((root / "docs").glob("*.md"))]:
        named |= set(re.findall(r"tune_spaces/([\w.-]+\.yaml)", doc.read_text()))
    assert {"demo.yaml", "teachers.yaml"} <= named  # the README's commands use both
    assert named <= names, f"docs name spaces that do not exist: {sorted(named - names)}"


def _sample(space):
    """One configuration of a (nested) param_space: a draw of every distribution, the first of every grid."""
    from ray import tune

    if isinstance(space, tune.search.sample.Domain):
        return space.sample()
    if isinstance(space, dict):
        if set(space) == {"grid_search"}:
            return space["grid_search"][0]
        return {k: _sample(v) for k, v in space.items()}
    return space


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_space_loads_and_builds_trial_configs(path):
    from mdlda.models import create_model
    from pipelines.teachers import param_space

    cfg = load_chain_config(path)
    assert ChainConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # a dump loads back to the same config
    for sweep in [cfg.teachers, *cfg.baselines]:
        space = param_space(sweep)
        assert set(space) == {"model", "train", "model_overrides"} and space["model"] == sweep.model
        trial = TrialConfig.model_validate(_sample(space))  # what a trial receives
        assert trial.train.mode == sweep.mode and trial.train.batch_size >= 2
        assert set(sweep.search) <= set(trial.params())  # MLflow params stay flat: lr, adv_scale, width
        create_model(trial.model, **{**trial.model_overrides, "width": 4})  # the overrides are real model options


def test_demo_batch_size_is_fixed_in_train():
    cfg = load_chain_config(SPACES[0].parent / "demo.yaml")
    for sweep in [cfg.teachers, *cfg.baselines]:
        assert "batch_size" not in sweep.search and sweep.train.batch_size == 8
        assert all(isinstance(spec, dict) for spec in sweep.search.values())  # search holds distributions only


def test_trial_config_is_nested_and_typed():
    from pipelines.teachers import param_space

    cfg = load_chain_config(SPACES[0].parent / "demo.yaml")
    space = param_space(cfg.teachers)
    assert space["train"]["batch_size"] == 8 and space["train"]["mode"] == "dann"
    assert space["model_overrides"] == {"width": 8}
    trial = TrialConfig.model_validate(_sample(space))
    assert 1e-3 <= trial.train.lr <= 4e-3 and trial.train.lr_milestones == (4, 6)
    assert {"model", "mode", "width", "lr", "adv_scale", "seed", "batch_size", "max_epochs"} <= set(trial.params())


def test_grid_size_counts_nested_grids():
    from ray import tune

    from pipelines.spaces import grid_size

    space = {"train": {"lr": tune.grid_search([1, 2, 3])}, "model_overrides": {"width": tune.grid_search([4, 8])}}
    assert grid_size(space) == 6 and grid_size({"train": {"lr": 1e-3}}) == 1


def test_overrides_and_errors(tmp_path):
    demo = SPACES[0].parent / "demo.yaml"
    cfg = load_chain_config(demo, ["teachers.num_samples=3", "baselines.0.top_k=1"])
    assert cfg.teachers.num_samples == 3
    with pytest.raises(ConfigError, match="key=value"):
        load_chain_config(None, ["teachers.num_samples"])
    with pytest.raises(ConfigError, match="not an index"):
        load_chain_config(demo, ["baselines.9.top_k=1"])
    with pytest.raises(ConfigError, match="teachers.num_samples: .*boolean"):
        load_chain_config(demo, ["teachers.num_samples=no"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers:\n  num_sampels: 3\n")
    with pytest.raises(ConfigError, match="num_sampels.*known keys.*num_samples"):
        load_chain_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_chain_config(tmp_path / "missing.yaml")


SEARCHABLE = "teachers:\n  search:\n    {}\n"

# (YAML, the key path the error names, what else it says: the allowed values or the bound)
BAD = {
    "typo in train": ("teachers:\n  train: {max_epoch: 8}\n", "teachers.train.max_epoch", r"known keys: .*max_epochs"),
    "typo in a baseline's train": (
        "baselines:\n  - {name: b, mode: supervised, train: {patiense: 2}}\n",
        "baselines.0.train.patiense",
        r"known keys: .*patience",
    ),
    "typo in the student's train": ("student:\n  train: {lrr: 0.1}\n", "student.train.lrr", r"known keys: .*'lr'"),
    "unknown model override": (
        "teachers:\n  model_overrides: {widht: 8}\n",
        "teachers.model_overrides.widht",
        r"options: .*'width'",
    ),
    "unknown student override": (
        "student:\n  model_overrides: {dropout: 0.1}\n",
        "student.model_overrides.dropout",
        r"not an option of model 'rfresnet'",
    ),
    "bad override value": ("teachers:\n  model_overrides: {width: 0}\n", "teachers.model_overrides", "width"),
    "unknown model": ("teachers:\n  model: resnet\n", "teachers.model", r"known models: .*rfresnet"),
    "unknown search key": (
        SEARCHABLE.format("max_epoch: {choice: [4, 8]}"),
        "teachers.search.max_epoch",
        r"not a searchable setting; searchable: .*max_epochs.*width",
    ),
    "searched mode": (SEARCHABLE.format("mode: {choice: [dann, supervised]}"), "teachers.search.mode", "mode"),
    "unknown distribution": (
        SEARCHABLE.format("lr: {logunifrom: [1.0e-4, 1.0e-3]}"),
        "teachers.search.lr",
        r"unknown distribution 'logunifrom'; use one of \['choice', 'grid', 'loguniform'",
    ),
    "two distributions": (
        SEARCHABLE.format("lr: {uniform: [0.1, 0.2], choice: [0.1]}"),
        "teachers.search.lr",
        "expected one distribution",
    ),
    "arguments not a list": (SEARCHABLE.format("lr: {loguniform: 0.1}"), "teachers.search.lr", "list of 2"),
    "text arguments": (SEARCHABLE.format("lr: {loguniform: [1e-4, 1e-3]}"), "teachers.search.lr", "needs numbers"),
    "empty range": (SEARCHABLE.format("lr: {uniform: [0.2, 0.1]}"), "teachers.search.lr", "lower < upper"),
    "searched value out of bounds": (
        SEARCHABLE.format("batch_size: {choice: [8, 1]}"),
        "teachers.search.batch_size",
        "greater than or equal to 2",
    ),
    "searched model option out of bounds": (
        SEARCHABLE.format("width: {choice: [8, 0]}"),
        "teachers.search.width",
        "width",
    ),
    "fixed and searched": (
        "teachers:\n  train: {lr: 0.1}\n  search: {lr: {choice: [0.1, 0.2]}}\n",
        "teachers.search.lr",
        r"also fixed in train\.lr",
    ),
    "train.mode against the sweep's": ("teachers:\n  train: {mode: supervised}\n", "teachers.train.mode", "'dann'"),
    "no as a number": ("teachers:\n  num_samples: no\n", "teachers.num_samples", "boolean"),
    "off in train": ("teachers:\n  train: {max_epochs: off}\n", "teachers.train.max_epochs", "boolean"),
    "yes as a fraction": ("data:\n  eval_fraction: yes\n", "data.eval_fraction", "boolean"),
    "num_samples 0": ("teachers:\n  num_samples: 0\n", "teachers.num_samples", "greater than or equal to 1"),
    "num_samples -3": ("teachers:\n  num_samples: -3\n", "teachers.num_samples", "greater than or equal to 1"),
    "top_k 0": ("teachers:\n  top_k: 0\n", "teachers.top_k", "greater than or equal to 1"),
    "cpus_per_trial 0": ("teachers:\n  cpus_per_trial: 0\n", "teachers.cpus_per_trial", "greater than 0"),
    "search_seed -1": ("teachers:\n  search_seed: -1\n", "teachers.search_seed", "greater than or equal to 0"),
    "max_failure_share 5": ("data:\n  max_failure_share: 5\n", "data.max_failure_share", "less than or equal to 1"),
    "eval_fraction 1.5": ("data:\n  eval_fraction: 1.5\n", "data.eval_fraction", "less than 1"),
    "materialize_share 2": ("materialize_share: 2\n", "materialize_share", "less than or equal to 1"),
    "student workers 0": ("student:\n  num_workers: 0\n", "student.num_workers", "greater than or equal to 1"),
    "pseudo-label batch 0": ("pseudolabel:\n  batch_size: 0\n", "pseudolabel.batch_size", "greater than or equal"),
    "train lr 0": ("student:\n  train: {lr: 0}\n", "student.train.lr", "greater than 0"),
    "unknown device": ("student:\n  train: {device: gpu}\n", "student.train.device", "'cpu', 'cuda', 'cuda:N'"),
    "unknown scheduler": ("teachers:\n  scheduler: hyperband\n", "teachers.scheduler", "'asha' or 'fifo'"),
    "duplicate top-level key": (
        "teachers:\n  num_samples: 2\nteachers:\n  num_samples: 3\n",
        "teachers",
        r"duplicate key\(s\) teachers \(lines 1 and 3\)",
    ),
    "duplicate nested key": (
        "teachers:\n  search:\n    lr: {choice: [0.1]}\n    lr: {choice: [0.2]}\n",
        "teachers.search.lr",
        "duplicate key",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_malformed_config_fails_at_load_naming_file_and_key(tmp_path, case):
    text, key, allowed = BAD[case]
    path = tmp_path / "chain.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_chain_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    assert re.search(rf"(^|[ ;(]){re.escape(key)}\b", msg), msg
    assert re.search(allowed, msg), msg


def test_every_problem_of_a_file_is_named_at_once(tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text("teachers:\n  top_k: 0\n  train: {max_epoch: 8}\nstudent:\n  num_workers: 0\n")
    with pytest.raises(ConfigError, match="3 problem") as info:
        load_chain_config(path)
    for key in ("teachers.top_k", "teachers.train.max_epoch", "student.num_workers"):
        assert key in str(info.value)


def test_a_constant_in_search_is_a_fixed_value():
    from pipelines.teachers import param_space

    cfg = ChainConfig.model_validate({"teachers": {"search": {"seed": 3, "width": 16, "lr": {"choice": [0.1]}}}})
    space = param_space(cfg.teachers)
    assert space["train"]["seed"] == 3 and space["model_overrides"]["width"] == 16


def test_unknown_distribution_is_named():
    from pipelines.spaces import SearchSpaceError, to_tune

    with pytest.raises(SearchSpaceError, match="lr.*logunifrom"):
        to_tune({"lr": {"logunifrom": [1e-4, 1e-3]}})
    with pytest.raises(SearchSpaceError, match="list of arguments"):
        to_tune({"lr": {"loguniform": 0.1}})
