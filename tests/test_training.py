"""The one training loop: overfitting, early stopping, NaN status, determinism, resume, schedules."""

import logging
import random

import numpy as np
import pytest
import torch
from tiny_models import (
    TRAIN,
    VALID,
    TinyModel,
    batches_of,
    one_thread,  # noqa: F401  (autouse fixture)
    quick,
    shuffled_train,
    valid,
)

from mdlda.adapt import DomainHead
from mdlda.checkpoints import load_training_state, save_training_state, seed_everything
from mdlda.training import TrainConfig, fit


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


@pytest.mark.parametrize("clip", [None, 0.5])
def test_gradient_clipping_bounds_the_global_norm_the_optimiser_sees(clip):
    from mdlda.precision import Precision, optimizer_step

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(3))
    seen = []
    opt = torch.optim.SGD([w], lr=1.0)
    opt.register_step_pre_hook(lambda o, a, k: seen.append(w.grad.norm().item()))
    loss = (w * torch.tensor([30.0, 40.0, 0.0])).sum()  # gradient (30, 40, 0): norm 50
    optimizer_step(loss, opt, Precision(False, torch.device("cpu")), grad_clip_norm=clip)
    assert seen == [pytest.approx(50.0 if clip is None else 0.5, rel=1e-5)]
    assert w.detach().norm().item() == pytest.approx(seen[0], rel=1e-5)  # SGD lr 1: the step is the gradient
    if clip is not None:  # and the whole loop accepts the option
        assert fit(TinyModel(), shuffled_train, valid, quick(max_epochs=1, grad_clip_norm=clip)).status == "completed"


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
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())  # zero gradients: Adam stands still


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
        TinyModel(), shuffled_train, valid, quick(mode="dann", max_epochs=9), DomainHead(16), on_epoch=on_epoch
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


def test_device_monitor_logs_nothing_on_cpu_and_warns_once_without_nvml(caplog):
    from mdlda.devices import DeviceMonitor

    assert DeviceMonitor(torch.device("cpu")).epoch_metrics() == {}

    def no_nvml(device):
        raise ModuleNotFoundError("No module named 'pynvml'")

    gpu = DeviceMonitor(torch.device("cuda"), utilization=no_nvml)  # the path a GPU without NVML takes
    with caplog.at_level(logging.WARNING, logger="mdlda.training"):
        assert gpu.util_metrics() == {} and gpu.util_metrics() == {}
    warnings = [r for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warnings) == 1 and "nvidia-ml-py" in warnings[0].getMessage()
    assert DeviceMonitor(torch.device("cuda"), utilization=lambda d: 87.0).util_metrics() == {"gpu_util": 87.0}


@pytest.mark.parametrize("select_on", ["r_mean", "loss"])
def test_the_best_epoch_is_the_one_select_on_names(select_on):
    result = fit(TinyModel(), shuffled_train, valid, quick(max_epochs=4, patience=4, select_on=select_on))
    h = result.history
    loss, r = [e["valid_loss"] for e in h], [e["valid_r_mean"] for e in h]
    want = int(np.argmax(r)) if select_on == "r_mean" else int(np.argmin(loss))
    assert result.best_epoch == want and result.best_score == r[want]  # best_score stays the r at that epoch
    with pytest.raises(ValueError, match="select_on"):
        TrainConfig(select_on="r")


# ------------------------------------------------------------------------------- GPU settings, run on a CPU
def _rfresnet_run(**switches):
    from mdlda.models import create_model

    seed_everything(0)
    model = create_model("rfresnet", width=4)
    audio, labels = torch.randn(4, 22050 * 2) * 0.1, torch.rand(4, 7) * 9 + 1
    one = batches_of(audio, labels, size=4, target_audio=audio.flip(0), target_labels=labels.flip(0))
    result = fit(model, lambda e: one, lambda: one, quick(max_epochs=2, lr=3e-3, mode="distill", **switches))
    return model, [h["train_loss"] for h in result.history], audio


def test_channels_last_keeps_the_numbers_and_the_checkpoint_layout_free():
    from mdlda.models import create_model

    plain, plain_losses, audio = _rfresnet_run()
    nhwc, losses, _ = _rfresnet_run(channels_last=True)
    assert nhwc.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert losses == pytest.approx(plain_losses, rel=1e-4)  # a layout, not other math (sums in another order)
    fresh = create_model("rfresnet", width=4)  # a registry model: default layout
    fresh.load_state_dict(nhwc.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(audio), nhwc.eval()(audio), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_on_cpu_runs_the_network_in_bf16_and_the_front_end_in_fp32(caplog):
    from mdlda.models import create_model
    from mdlda.precision import Precision

    model = create_model("rfresnet", width=4).train()
    seen = {}
    for name, module in (("frontend", model.frontend), ("conv", model.stem[0]), ("head", model.head)):
        module.register_forward_hook(lambda m, i, o, name=name: seen.update({name: o.dtype}))
    with Precision(True, torch.device("cpu"), on_cpu=True).autocast():
        model(torch.randn(4, 22050 * 2) * 0.1)
    assert seen == {"frontend": torch.float32, "conv": torch.bfloat16, "head": torch.bfloat16}  # loss: in fp32
    with caplog.at_level(logging.WARNING, logger="mdlda"):
        assert Precision(True, torch.device("cpu")).dtype is None  # without mixed_precision_cpu: fp32, said so
    assert "CUDA-only" in caplog.text
    _, losses, _ = _rfresnet_run(mixed_precision=True, mixed_precision_cpu=True)
    assert all(np.isfinite(losses))


def test_compile_is_in_place_so_checkpoints_keep_their_keys():
    from mdlda.devices import compile_network
    from mdlda.models import create_model

    model = create_model("rfresnet", width=4)
    keys = list(model.state_dict())
    compile_network(model)
    compiled = {name for name, child in model.named_children() if child._compiled_call_impl is not None}
    assert compiled == {"stem", "stage1", "stage2", "stage3", "head"}  # every block but the front end
    assert list(model.state_dict()) == keys


def test_pinned_copies_are_a_no_op_on_a_cpu():
    from mdlda.batches import prepare_batch

    raw = {"audio": TRAIN[0][:4], "labels": TRAIN[1][:4]}
    b = prepare_batch(raw, "supervised", "cpu", pin_memory=True)
    assert torch.equal(b["audio"], TRAIN[0][:4]) and b["audio"].device.type == "cpu"
    assert TrainConfig().pin_memory and not TrainConfig().channels_last and not TrainConfig().compile
