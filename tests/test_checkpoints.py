import json
import random

import numpy as np
import pytest
import torch
from tiny_models import one_thread  # noqa: F401  (autouse fixture: one torch thread for tiny tensors)

from mdlda.checkpoints import (
    CheckpointMismatch,
    capture_rng_state,
    load_model,
    load_training_state,
    read_extra,
    read_model_config,
    restore_rng_state,
    save_model,
    save_training_state,
    seed_everything,
)
from mdlda.models import create_model
from mdlda.training import TrainConfig, fit


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("rfresnet", width=4)
    with torch.no_grad():  # make running stats and BN biases non-default so the round trip has something to carry
        m.train()(torch.randn(4, 22050) * 0.1)
    return m.eval()


def test_model_round_trip(model, tmp_path):
    save_model(model, tmp_path / "ckpt", extra={"valid_r_mean": 0.5, "epoch": 3})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "extra.json", "model.pt"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == model.config.to_dict()
    assert read_model_config(tmp_path / "ckpt")["name"] == "rfresnet"
    assert read_extra(tmp_path / "ckpt") == {"valid_r_mean": 0.5, "epoch": 3}
    loaded = load_model(tmp_path / "ckpt", expect_config=model.config.to_dict())
    assert loaded.config == model.config and not loaded.training
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    audio = torch.randn(2, 22050) * 0.1
    with torch.no_grad():
        assert torch.equal(model(audio), loaded(audio))


def test_model_file_is_a_plain_state_dict(model, tmp_path):
    save_model(model, tmp_path)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(state) == set(model.state_dict()) and all(t.device.type == "cpu" for t in state.values())


@pytest.mark.parametrize(
    ("expect", "named"),
    [
        ({"frontend": {"hop_size": 512}}, "frontend.hop_size: checkpoint has 704, expected 512"),
        ({"width": 8}, "width: checkpoint has 4, expected 8"),
        ({"name": "vggish"}, "name: checkpoint has 'rfresnet', expected 'vggish'"),
        ({"frontend": {"new_option": 1}}, "frontend.new_option: missing in the checkpoint"),
    ],
)
def test_mismatched_config_is_refused_naming_the_keys(model, tmp_path, expect, named):
    save_model(model, tmp_path)
    with pytest.raises(CheckpointMismatch, match="another model config") as err:
        load_model(tmp_path, expect_config=expect)
    assert named in str(err.value)


def test_other_front_end_config_is_refused(model, tmp_path):
    save_model(create_model("rfresnet", width=4, frontend={"hop_size": 512}), tmp_path)
    with pytest.raises(CheckpointMismatch) as err:
        load_model(tmp_path, expect_config=model.config.to_dict())
    assert "frontend.hop_size" in str(err.value) and "width" not in str(err.value)
    assert load_model(tmp_path).config.frontend.hop_size == 512  # without expectations it loads as saved


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model checkpoint"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no training state"):
        load_training_state(tmp_path)


def test_unserialisable_extra_writes_nothing(model, tmp_path):
    with pytest.raises(TypeError):
        save_model(model, tmp_path / "x", extra={"bad": object()})
    assert not (tmp_path / "x").exists()


def test_training_state_round_trips_with_weights_only(model, tmp_path):
    seed_everything(0)
    m = create_model("rfresnet", width=4)
    batch = {"audio": torch.randn(4, 22050) * 0.1, "labels": torch.rand(4, 7) * 9 + 1}
    states = []
    config = TrainConfig(device="cpu", max_epochs=2)
    fit(m, lambda e: [batch], lambda: [batch], config, on_epoch=lambda r: states.append(r.state()))
    path = save_training_state(states[-1], tmp_path)
    assert path.name == "training_state.pt" and [p.name for p in tmp_path.iterdir()] == [path.name]
    loaded = torch.load(path, weights_only=True)  # only tensors, containers, numbers and strings inside
    assert loaded.keys() == states[-1].keys() and loaded["next_epoch"] == 2
    assert all(torch.equal(loaded["model"][k], v) for k, v in states[-1]["model"].items())
    assert loaded["optimizer"]["param_groups"] == states[-1]["optimizer"]["param_groups"]
    assert loaded["scheduler"]["last_epoch"] == 2 and len(loaded["history"]) == 2
    assert loaded["config"] == config.to_dict()


def test_rng_states_restore_exactly():
    seed_everything(5)
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(10), np.random.rand(10), random.random()  # noqa: B018
    restore_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    assert all(isinstance(v, torch.Tensor) for v in (state["torch"], state["numpy"]["keys"]))
