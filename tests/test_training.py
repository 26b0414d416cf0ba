"""The training steps and the one training loop, on a tiny stand-in model (and briefly the real RF-ResNet)."""

import dataclasses
import logging
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from mdlda.adapt import DomainHead
from mdlda.checkpoints import load_training_state, save_training_state, seed_everything
from mdlda.params import LABEL_SCALE, NUM_FEATURES
from mdlda.steps import dann_step, distill_step, prepare_batch, supervised_step
from mdlda.training import TrainConfig, fit

FRAME = 32
N_SAMPLES = FRAME * 20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: thread start-up dominates, and on a busy 2-CPU box two threads can be 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class TinyConfig:
    dim: int = 16
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return {"name": "tiny", **dataclasses.asdict(self)}


class TinyModel(nn.Module):
    """Frames -> Linear -> time mean -> BN -> ReLU (features); Linear -> BN (head, like RF-ResNet's)."""

    def __init__(self, **overrides) -> None:
        super().__init__()
        self.config = TinyConfig(**overrides)
        self.embed_dim = self.config.dim
        self.frontend = nn.Identity()
        self.proj = nn.Linear(FRAME, self.config.dim)
        self.bn = nn.BatchNorm1d(self.config.dim)
        self.drop = nn.Dropout(self.config.dropout)
        self.head = nn.Sequential(nn.Linear(self.config.dim, NUM_FEATURES), nn.BatchNorm1d(NUM_FEATURES))

    def forward_features(self, audio: torch.Tensor) -> torch.Tensor:
        x = audio.float() / 32767.0 if audio.dtype == torch.int16 else audio.float()
        frames = x.reshape(x.shape[0], -1, FRAME)  # (B, T, FRAME)
        h = self.proj(frames).mean(dim=1)  # (B, dim)
        return self.drop(torch.relu(self.bn(h)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(audio))


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio whose frame pattern amplitudes determine the 7 ratings (learnable by TinyModel)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(NUM_FEATURES, FRAME, generator=torch.Generator().manual_seed(123))
    amp = torch.rand(n, NUM_FEATURES, generator=g)  # (n, 7)
    frame = amp @ basis * 0.05  # (n, FRAME)
    audio = frame.repeat(1, N_SAMPLES // FRAME) + 0.01 * torch.randn(n, N_SAMPLES, generator=g)
    return audio, 1.0 + 9.0 * amp


def batches_of(audio, labels, size=8, **extra):
    return [
        {
            "audio": audio[i : i + size],
            "labels": labels[i : i + size],
            **{k: v[i : i + size] for k, v in extra.items()},
        }
        for i in range(0, len(audio), size)
    ]


TRAIN, VALID = make_data(32, 0), make_data(16, 1)
TARGET = make_data(32, 2)


def shuffled_train(epoch: int):
    """Uses the global torch, numpy and Python RNGs on purpose: resuming must restore all three."""
    perm = torch.randperm(len(TRAIN[0]))
    noise = torch.from_numpy(np.random.normal(0, 1e-3, size=TRAIN[0].shape).astype(np.float32))
    size = random.choice([8, 8])
    return batches_of(TRAIN[0][perm] + noise, TRAIN[1][perm], size=size, target_audio=TARGET[0])


def valid():
    return batches_of(*VALID, size=16)


def quick(**kw) -> TrainConfig:
    return TrainConfig(**{"device": "cpu", "lr": 1e-2, "max_epochs": 4, "patience": 50, **kw})


def record_bn_batch_sizes(model: nn.Module) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            seen[name] = []
            module.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].shape[0]))
    return seen


def head_bn_names(model: nn.Module, seen: dict[str, list[int]]) -> set[str]:
    """The BN layers that belong to forward_head (found by running the head alone)."""
    before = {k: len(v) for k, v in seen.items()}
    model.forward_head(torch.randn(4, model.embed_dim))
    names = {k for k, v in seen.items() if len(v) > before[k]}
    for k in seen:
        del seen[k][before[k] :]
    return names


# ------------------------------------------------------------------------------------------------------ steps
@pytest.mark.parametrize("make", [lambda: TinyModel(), "rfresnet"])
def test_dann_step_passes_each_domain_separately_and_regresses_on_source_only(make):
    if make == "rfresnet":
        from mdlda.models import create_model

        torch.manual_seed(0)
        model, n = create_model("rfresnet", width=4), 22050 * 2
    else:
        model, n = make(), N_SAMPLES
    head = DomainHead(model.embed_dim)
    seen = record_bn_batch_sizes(model)
    in_head = head_bn_names(model, seen)
    assert seen and in_head
    feats, head_inputs = [], []
    ff, fh = model.forward_features, model.forward_head
    model.forward_features = lambda x: feats.append(ff(x)) or feats[-1]
    model.forward_head = lambda f: head_inputs.append(f) or fh(f)
    batch = prepare_batch(
        {
            "audio": torch.randn(8, n) * 0.1,
            "labels": torch.rand(8, 7) * 9 + 1,
            "target_audio": torch.randn(8, n),
        },
        "dann",
        "cpu",
    )
    out = dann_step(model, head, batch, adv_lambda=0.3)
    out.loss.backward()
    for name, sizes in seen.items():
        # never one concatenated batch of 16: features BN twice (source, target), head BN once (source)
        assert sizes == ([8] if name in in_head else [8, 8]), name
    assert len(feats) == 2 and len(head_inputs) == 1 and head_inputs[0] is feats[0]
    assert set(out.losses) == {"loss", "mse", "domain_bce", "domain_acc", "adv_lambda"}
    assert out.losses["loss"] == pytest.approx(out.losses["mse"] + out.losses["domain_bce"], rel=1e-5)
    assert out.losses["adv_lambda"] == 0.3 and head.grl.lambda_.item() == pytest.approx(0.3)
    assert all(p.grad is not None for p in head.parameters())


def test_dann_step_reverses_the_domain_gradient_into_the_features():
    torch.manual_seed(0)
    model = TinyModel()
    batch = prepare_batch(
        {"audio": TRAIN[0][:8], "labels": TRAIN[1][:8], "target_audio": TARGET[0][:8]}, "dann", "cpu"
    )
    grads = {}
    for lam in (0.0, 1.0):
        torch.manual_seed(1)
        head = DomainHead(model.embed_dim)
        model.zero_grad()
        dann_step(model, head, batch, adv_lambda=lam).loss.backward()
        grads[lam] = model.proj.weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[1.0])  # lambda 0: features get the regression gradient only


def test_dann_step_needs_equal_domain_sizes():
    batch = prepare_batch(
        {"audio": TRAIN[0][:8], "labels": TRAIN[1][:8], "target_audio": TARGET[0][:4]}, "dann", "cpu"
    )
    with pytest.raises(ValueError, match="equal numbers"):
        dann_step(TinyModel(), DomainHead(16), batch, adv_lambda=1.0)


def test_distill_step_uses_both_domains_in_separate_passes():
    torch.manual_seed(0)
    model = TinyModel()
    seen = record_bn_batch_sizes(model)
    raw = {
        "audio": TRAIN[0][:8],
        "labels": TRAIN[1][:8],
        "target_audio": TARGET[0][:4],
        "target_labels": TARGET[1][:4],
    }
    out = distill_step(model, prepare_batch(raw, "distill", "cpu"))
    assert all(sizes == [8, 4] for sizes in seen.values())
    with torch.no_grad():  # train-mode BN: the same per-domain passes give the same outputs
        pred = torch.cat([model(raw["audio"]), model(raw["target_audio"])])
        want = torch.nn.functional.mse_loss(
            pred, torch.cat([raw["labels"], raw["target_labels"]]) / LABEL_SCALE
        )
    assert out.losses["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert out.losses["mse_target"] > 0 and out.losses["mse_source"] > 0


class ForwardOnly(nn.Module):
    """Like DistributedDataParallel: exposes forward() and nothing else of the wrapped model."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, audio):
        return self.module(audio)


def test_supervised_and_distill_steps_work_through_a_forward_only_wrapper():
    raw = {
        "audio": TRAIN[0][:8],
        "labels": TRAIN[1][:8],
        "target_audio": TARGET[0][:4],
        "target_labels": TARGET[1][:4],
    }
    for mode, step in (("supervised", supervised_step), ("distill", distill_step)):
        out = step(ForwardOnly(TinyModel()), prepare_batch(raw, mode, "cpu"))
        assert np.isfinite(out.losses["loss"])


def test_supervised_step_is_mse_on_the_0_1_scale():
    torch.manual_seed(0)
    model = TinyModel()
    out = supervised_step(
        model, prepare_batch({"audio": TRAIN[0][:8], "labels": TRAIN[1][:8]}, "supervised", "cpu")
    )
    want = torch.nn.functional.mse_loss(model(TRAIN[0][:8]), TRAIN[1][:8] / 10)
    assert out.losses["loss"] == pytest.approx(want.item(), rel=1e-5)


def test_nan_labels_are_a_clear_error():
    labels = TRAIN[1][:8].clone()
    labels[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf labels in rows \[3\]"):
        prepare_batch({"audio": TRAIN[0][:8], "labels": labels}, "supervised", "cpu")
    with pytest.raises(ValueError, match="NaN"):
        fit(TinyModel(), lambda e: [{"audio": TRAIN[0][:8], "labels": labels}], valid, quick())


def test_prepare_batch_accepts_numpy_and_int16():
    b = prepare_batch(
        {
            "audio": (TRAIN[0][:4].numpy() * 32767).astype(np.int16),
            "labels": TRAIN[1][:4].numpy().astype(np.float64),
        },
        "supervised",
        "cpu",
    )
    assert b["audio"].dtype == torch.int16 and b["labels"].dtype == torch.float32
    assert torch.allclose(b["labels"], TRAIN[1][:4] / 10)
    with pytest.raises(KeyError, match="target_audio"):
        prepare_batch({"audio": TRAIN[0][:4], "labels": TRAIN[1][:4]}, "dann", "cpu")


# ------------------------------------------------------------------------------------------------------- fit
def test_tiny_model_overfits_a_tiny_batch():
    seed_everything(0)
    model = TinyModel()
    one = batches_of(TRAIN[0][:8], TRAIN[1][:8])
    result = fit(model, lambda e: one, lambda: one, quick(max_epochs=150, lr_milestones=(1000,)))
    losses = [h["train_loss"] for h in result.history]
    assert result.status == "completed" and result.epochs_run == 150
    assert losses[-1] < 0.1 * losses[0]
    assert result.best_score > 0.9


def test_rfresnet_trains_with_fit():
    from mdlda.models import create_model

    seed_everything(0)
    model = create_model("rfresnet", width=4)
    audio, labels = torch.randn(8, 22050 * 2) * 0.1, torch.rand(8, 7) * 9 + 1
    one = batches_of(audio.to(torch.float32), labels, size=4)
    result = fit(model, lambda e: one, lambda: one, quick(max_epochs=3))
    assert result.status == "completed" and len(result.history) == 3
    assert all(np.isfinite(h["train_loss"]) for h in result.history)


def test_early_stopping_keeps_the_best_epochs_weights():
    """Train on the labels, then on mirrored labels: validation r rises, then falls."""
    seed_everything(0)
    model = TinyModel()
    good, mirrored = batches_of(*TRAIN), batches_of(TRAIN[0], 11.0 - TRAIN[1])
    weights = {}

    def on_epoch(r):
        weights[r.epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    result = fit(
        model,
        lambda e: good if e < 4 else mirrored,
        valid,
        quick(max_epochs=40, patience=3),
        on_epoch=on_epoch,
    )
    scores = [h["valid_r_mean"] for h in result.history]
    assert result.status == "early_stopped"
    assert result.best_epoch == int(np.argmax(scores)) and result.best_score == max(scores)
    last = len(scores) - 1
    assert last == result.best_epoch + 3 and scores[last] < scores[result.best_epoch]
    final = model.state_dict()
    assert all(torch.equal(final[k], weights[result.best_epoch][k]) for k in final)
    assert not all(torch.equal(final[k], weights[last][k]) for k in final)
    assert all(torch.equal(result.best_state_dict[k], final[k]) for k in final)


@pytest.mark.parametrize("poison", ["inf_audio", "huge_lr"])
def test_nan_loss_ends_the_run_with_status_nan(poison):
    seed_everything(0)
    batches = batches_of(*TRAIN)
    config = quick(max_epochs=20)
    if poison == "inf_audio":
        bad = dict(batches[1], audio=batches[1]["audio"].clone())
        bad["audio"][0, 5] = float("inf")
        batches[1] = bad
    else:
        config = quick(max_epochs=20, lr=1e30)
    seen = []
    result = fit(TinyModel(), lambda e: batches, valid, config, on_epoch=seen.append)
    assert result.status == "nan"
    assert "non-finite" in result.message or "not finite" in result.message
    if poison == "inf_audio":
        assert "epoch 0, batch 1" in result.message and "audio contain NaN/inf" in result.message
        assert seen == [] and result.best_state_dict is None


def test_non_finite_validation_ends_the_run_with_status_nan():
    audio = VALID[0].clone()
    audio[2, 0] = float("nan")
    result = fit(TinyModel(), shuffled_train, lambda: batches_of(audio, VALID[1], size=16), quick())
    assert result.status == "nan" and "validation" in result.message and result.epochs_run == 0


def test_gradient_clipping_runs():
    result = fit(TinyModel(), shuffled_train, valid, quick(max_epochs=2, grad_clip_norm=0.5))
    assert result.status == "completed"


def test_after_backward_runs_between_backward_and_step():
    model = TinyModel()
    before = {k: v.clone() for k, v in model.named_parameters()}
    calls = []

    def zero_grads(params):
        calls.append(sum(p.grad is not None for p in params))
        for p in params:
            p.grad.zero_()

    config = quick(max_epochs=2, weight_decay=0.0, grad_clip_norm=1.0)
    fit(model, lambda e: batches_of(*TRAIN), valid, config, after_backward=zero_grads)
    assert calls == [len(before)] * 8  # 2 epochs x 4 batches, every parameter has a gradient
    assert all(
        torch.equal(before[k], v) for k, v in model.named_parameters()
    )  # zero gradients: Adam stands still


def test_same_seed_same_run():
    runs = []
    for _ in range(2):
        seed_everything(3)
        model = TinyModel(dropout=0.2)
        result = fit(model, shuffled_train, valid, quick(seed=3))
        runs.append(([h["train_loss"] for h in result.history], model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    seed_everything(3)
    other = fit(TinyModel(dropout=0.2), shuffled_train, valid, quick(seed=4))
    assert [h["train_loss"] for h in other.history] != runs[0][0]


TIMING = {"seconds", "train_seconds", "samples_per_s", "data_wait_fraction"}


@pytest.mark.parametrize("mode", ["supervised", "dann"])
def test_resume_from_a_saved_state_equals_an_uninterrupted_run(mode, tmp_path):
    config = quick(mode=mode, max_epochs=5, lr_milestones=(1, 3), adv_scale=0.5, lambda_schedule_epochs=3)

    def build(seed):
        seed_everything(seed)
        model = TinyModel(dropout=0.3)
        return model, (DomainHead(model.embed_dim) if mode == "dann" else None)

    model, head = build(0)
    full = fit(model, shuffled_train, valid, config, domain_head=head)

    def stop_after_2(r):
        if r.epoch == 2:
            save_training_state(r.state(), tmp_path)
            return True

    model, head = build(0)
    first = fit(model, shuffled_train, valid, config, domain_head=head, on_epoch=stop_after_2)
    assert first.status == "stopped" and first.epochs_run == 3
    torch.manual_seed(99), np.random.seed(99), random.seed(99)  # noqa: B018 - disturb every RNG
    model, head = build(7)  # other initial weights: the state must overwrite everything
    resumed = fit(model, shuffled_train, valid, config, domain_head=head, state=load_training_state(tmp_path))
    assert resumed.status == full.status == "completed" and resumed.epochs_run == 5
    strip = [[{k: v for k, v in h.items() if k not in TIMING} for h in r.history] for r in (full, resumed)]
    assert strip[0] == strip[1]
    assert resumed.best_epoch == full.best_epoch
    assert all(torch.equal(full.best_state_dict[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(full.best_state_dict[k], v) for k, v in resumed.best_state_dict.items())


def test_epoch_results_and_callback_stop():
    seen = []

    def on_epoch(r):
        seen.append(r)
        assert r.state()["next_epoch"] == r.epoch + 1
        return r.epoch == 1

    result = fit(
        TinyModel(), shuffled_train, valid, quick(mode="dann", max_epochs=9), DomainHead(16), on_epoch
    )
    assert result.status == "stopped" and [r.epoch for r in seen] == [0, 1]
    r = seen[-1]
    assert r.lr == pytest.approx(1e-2) and seen[0].lr == pytest.approx(1e-2)
    assert {"loss", "mse", "domain_bce", "domain_acc", "adv_lambda"} <= set(r.train)
    assert "r_mean" in r.valid and "loss" in r.valid and 0.0 <= r.data_wait_fraction <= 1.0
    assert r.samples_per_s > 0 and r.seconds >= r.train_seconds > 0
    m = r.metrics()
    assert m["valid_r_mean"] == r.valid["r_mean"] and m["train_domain_acc"] == r.train["domain_acc"]
    with pytest.raises(RuntimeError, match="inside the on_epoch callback"):
        r.state()


def test_lr_schedule_halves_at_the_milestones():
    result = fit(TinyModel(), shuffled_train, valid, quick(max_epochs=6, lr_milestones=(2, 5)))
    assert [h["lr"] for h in result.history] == pytest.approx([1e-2, 1e-2, 5e-3, 5e-3, 5e-3, 2.5e-3])


def test_mixed_precision_on_cpu_still_trains(caplog):
    seed_everything(0)
    one = batches_of(TRAIN[0][:8], TRAIN[1][:8])
    with caplog.at_level(logging.WARNING, logger="mdlda"):
        result = fit(
            TinyModel(),
            lambda e: one,
            lambda: one,
            quick(max_epochs=100, lr_milestones=(1000,), mixed_precision=True),
        )
    assert "CUDA-only" in caplog.text
    assert result.status == "completed"
    assert result.history[-1]["train_loss"] < 0.2 * result.history[0]["train_loss"]


def test_config_validation_and_round_trip():
    config = TrainConfig(mode="dann", adv_scale=0.3)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert config.lr == 1e-3 and config.lr_milestones == (2, 5, 10, 15, 20) and config.patience == 14
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(mode="adversarial")
    with pytest.raises(ValueError, match="unknown TrainConfig option"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="domain_head"):
        fit(TinyModel(), shuffled_train, valid, quick(mode="dann"))
