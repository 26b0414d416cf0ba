"""Models: registry, shapes, gradients, RF-ResNet architecture numbers, config round-trip."""

from __future__ import annotations

import json

import pytest
import torch

from mdlda.models import RFResNetConfig, create_model, list_models, receptive_field
from mdlda.models.rfresnet import FreqConv2d, block_kernels, frequency_channel
from mdlda.params import NUM_FEATURES, SEGMENT_SAMPLES

SMALL = {"rfresnet": 8, "vggish": 8}  # width per model for the fast tests


@pytest.fixture(scope="module")
def audio() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return 0.1 * torch.randn(2, SEGMENT_SAMPLES, generator=g)  # (2, 330750): two 15-s clips


def test_both_models_registered() -> None:
    assert {"rfresnet", "vggish"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_no_nan(name: str, audio: torch.Tensor) -> None:
    width = SMALL.get(name, 8)
    torch.manual_seed(0)
    model = create_model(name, width=width).train()
    features = model.forward_features(audio)
    assert features.shape == (2, 4 * width) == (2, model.embed_dim)
    out = model.forward_head(features)
    assert out.shape == (2, NUM_FEATURES)
    assert torch.isfinite(out).all()
    loss = (out - 0.5).pow(2).mean()
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_forward_is_head_of_features_and_int16_works(name: str, audio: torch.Tensor) -> None:
    model = create_model(name, width=SMALL.get(name, 8)).eval()
    pcm = (audio * 32767).round().to(torch.int16)
    with torch.no_grad():
        out = model(pcm)
        split = model.forward_head(model.forward_features(pcm))
    torch.testing.assert_close(out, split)


@pytest.mark.parametrize("name", list_models())
def test_eval_batch_one_and_train_mode(name: str, audio: torch.Tensor) -> None:
    model = create_model(name, width=SMALL.get(name, 8))
    model.eval()
    with torch.no_grad():
        one = model(audio[:1])  # (1, 7): BN uses running statistics
    assert one.shape == (1, NUM_FEATURES)
    with torch.no_grad():
        both = model(audio)
    torch.testing.assert_close(one[0], both[0], rtol=1e-4, atol=1e-5)  # eval: a sample ignores its batch mates
    model.train()
    assert model(audio).shape == (2, NUM_FEATURES)


def test_rfresnet_full_width_shapes(audio: torch.Tensor) -> None:
    model = create_model("rfresnet").eval()
    assert model.embed_dim == 512
    with torch.no_grad():
        spec = model.frontend(audio)
        assert spec.shape == (2, 1, 149, 469)
        maps = model.forward_maps(spec)
        assert maps.shape == (2, 512, 18, 58)
        features = maps.mean(dim=(2, 3))
        out = model.forward_head(features)
    assert features.shape == (2, 512)
    assert out.shape == (2, NUM_FEATURES)
    torch.testing.assert_close(model.features_from_spectrogram(spec), features)


def test_rfresnet_parameter_count() -> None:
    n = sum(p.numel() for p in create_model("rfresnet").parameters())
    assert 2.0e6 <= n <= 2.4e6, n


def test_rfresnet_receptive_field_and_map_size() -> None:
    layers = create_model("rfresnet", width=4).layer_list()
    assert receptive_field(layers, 149) == (95, 18)
    assert receptive_field(layers, 469) == (95, 58)


def test_receptive_field_arithmetic() -> None:
    assert receptive_field([], 10) == (1, 10)
    assert receptive_field([(3, 1, 1), (3, 1, 1)], 10) == (5, 10)
    assert receptive_field([(2, 2, 0), (3, 1, 1)], 10) == (6, 5)  # a 3-conv after a /2 pool spans 2 + 2 * 2


def test_rho_default_kernels_and_rf_grows_with_rho() -> None:
    assert RFResNetConfig().rho == 6
    assert block_kernels(6) == ((3, 1), (3, 3), (3, 3), (3, 3), (1, 1))
    assert block_kernels(0) == ((3, 1), (1, 1), (1, 1), (1, 1), (1, 1))
    rfs = [receptive_field(create_model("rfresnet", width=2, rho=r).layer_list(), 149)[0] for r in range(9)]
    assert rfs[6] == 95
    assert all(a < b for a, b in zip(rfs, rfs[1:], strict=False)), rfs
    with pytest.raises(ValueError, match="rho"):
        create_model("rfresnet", rho=9)


def test_frequency_channel_values() -> None:
    x = torch.zeros(2, 3, 4, 5)
    pos = frequency_channel(x)
    assert pos.shape == (2, 1, 4, 5)
    expected = torch.tensor([-1.0, -0.5, 0.0, 0.5])  # 2 i / H - 1
    for b in range(2):
        for col in range(5):
            torch.testing.assert_close(pos[b, 0, :, col], expected)


def test_freq_conv_sees_frequency_position() -> None:
    conv = FreqConv2d(1, 1, 1)
    assert conv.weight.shape == (1, 2, 1, 1)  # one input channel + the frequency channel
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 1] = 1.0  # pass the frequency channel through
    out = conv(torch.zeros(1, 1, 4, 3))  # no input signal at all
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5]))


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 1, 1), (5, 2, 1), (1, 1, 0)])
def test_freq_conv_equals_conv_over_concatenated_channel(kernel: int, stride: int, padding: int) -> None:
    torch.manual_seed(0)
    conv = FreqConv2d(4, 6, kernel, stride=stride, padding=padding)
    x = torch.randn(3, 4, 11, 13)
    stacked = torch.cat([x, frequency_channel(x)], dim=1)  # (3, 5, 11, 13): the definition
    want = torch.nn.functional.conv2d(stacked, conv.weight, None, stride, padding)
    torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-5)


def test_create_model_errors() -> None:
    with pytest.raises(ValueError, match="rfresnet") as err:
        create_model("resnet50")
    assert "vggish" in str(err.value)
    with pytest.raises(ValueError, match="depth"):
        create_model("rfresnet", depth=3)
    with pytest.raises(ValueError, match="width"):
        create_model("rfresnet", width=0)
    with pytest.raises(ValueError, match="even"):
        create_model("vggish", width=7)
    with pytest.raises(ValueError, match="FrontendConfig"):
        create_model("vggish", frontend={"hop": 512})


@pytest.mark.parametrize("name", list_models())
def test_config_round_trip(name: str) -> None:
    model = create_model(name, width=4, num_outputs=5, frontend={"hop_size": 512})
    d = json.loads(json.dumps(model.config.to_dict()))  # what MLflow stores
    assert d["name"] == name and d["width"] == 4 and d["frontend"]["hop_size"] == 512
    assert type(model.config).from_dict(d) == model.config
    rebuilt = create_model(**d)
    assert rebuilt.config == model.config
    assert rebuilt.frontend.config.hop_size == 512
    want = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == want
    rebuilt.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="not"):
        type(model.config).from_dict({**d, "name": "other"})
