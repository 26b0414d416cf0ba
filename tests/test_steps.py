"""The training steps: per-domain passes, losses, batch checks (tiny stand-in model, briefly the real RF-ResNet)."""

import numpy as np
import pytest
import torch
from tiny_models import (
    N_SAMPLES,
    TARGET,
    TRAIN,
    TinyModel,
    head_bn_names,
    one_thread,  # noqa: F401  (autouse fixture)
    quick,
    record_bn_batch_sizes,
    valid,
)
from torch import nn

from mdlda.adapt import DomainHead
from mdlda.batches import prepare_batch
from mdlda.dann_step import dann_step
from mdlda.distill_step import distill_step
from mdlda.params import LABEL_SCALE
from mdlda.steps import supervised_step
from mdlda.training import fit


@pytest.mark.parametrize("make", [lambda: TinyModel(), "rfresnet"])
def test_dann_step_passes_each_domain_separately_and_regresses_on_source_only(make):
    if make == "rfresnet":
        from mdlda.models import create_model

        torch.manual_seed(0)
        model, n = create_model("rfresnet", width=4, head="bn"), 22050 * 2
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
    batch = prepare_batch({"audio": TRAIN[0][:8], "labels": TRAIN[1][:8], "target_audio": TARGET[0][:8]}, "dann", "cpu")
    grads = {}
    for lam in (0.0, 1.0):
        torch.manual_seed(1)
        head = DomainHead(model.embed_dim)
        model.zero_grad()
        dann_step(model, head, batch, adv_lambda=lam).loss.backward()
        grads[lam] = model.proj.weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[1.0])  # lambda 0: features get the regression gradient only


def test_dann_step_needs_equal_domain_sizes():
    batch = prepare_batch({"audio": TRAIN[0][:8], "labels": TRAIN[1][:8], "target_audio": TARGET[0][:4]}, "dann", "cpu")
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
        want = torch.nn.functional.mse_loss(pred, torch.cat([raw["labels"], raw["target_labels"]]) / LABEL_SCALE)
    assert out.losses["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert out.losses["mse_target"] > 0 and out.losses["mse_source"] > 0


def test_an_adversarial_student_adds_the_domain_loss_to_the_distillation_loss():
    from mdlda.distill_step import distill_loss, run_distill
    from mdlda.domain_pair import DomainPair

    torch.manual_seed(0)
    model = TinyModel()
    seen = record_bn_batch_sizes(model)
    raw = {"audio": TRAIN[0][:8], "labels": TRAIN[1][:8], "target_audio": TARGET[0][:8], "target_labels": TARGET[1][:8]}
    batch = prepare_batch(raw, "distill", "cpu")
    grads = {}
    for lam in (0.0, 1.0):
        torch.manual_seed(1)
        head = DomainHead(model.embed_dim)
        pair = DomainPair(model, head, "both", predict_target=True)
        model.zero_grad()
        out = run_distill(pair, batch, lam)
        out.loss.backward()
        grads[lam] = model.proj.weight.grad.clone()
        assert all(p.grad is not None for p in head.parameters()) and out.losses["adv_lambda"] == lam
    # both domains predicted, each in its own pass (the regression head included): the distillation loss is the
    # head-less pair's, and the domain loss is added to it
    assert all(sizes[-2:] == [8, 8] for sizes in seen.values())
    plain = distill_loss(DomainPair(model, None, "both")(raw["audio"], raw["target_audio"]), batch)
    assert out.losses["mse_target"] == pytest.approx(plain.losses["mse_target"], rel=1e-5)
    assert out.losses["loss"] == pytest.approx(plain.losses["loss"] + out.losses["domain_bce"], rel=1e-5)
    assert not torch.allclose(grads[0.0], grads[1.0])  # the reversed domain gradient reaches the features
    one_domain = prepare_batch({"audio": TRAIN[0][:8], "labels": TRAIN[1][:8]}, "distill", "cpu")  # a pooled batch
    with pytest.raises(ValueError, match="paired mix"):
        run_distill(pair, one_domain, 1.0)


def test_distill_target_weights_scale_each_pseudo_labelled_segment():
    torch.manual_seed(0)
    model = TinyModel()
    raw = {"audio": TRAIN[0][:8], "labels": TRAIN[1][:8], "target_audio": TARGET[0][:4], "target_labels": TARGET[1][:4]}
    losses = {}
    for name, w in (("none", None), ("ones", [1.0] * 4), ("zeros", [0.0] * 4), ("half", [0.5, 0.0, 1.0, 0.25])):
        batch = prepare_batch({**raw, **({} if w is None else {"target_weights": np.array(w)})}, "distill", "cpu")
        losses[name] = distill_step(model, batch).losses
    assert losses["ones"]["loss"] == pytest.approx(losses["none"]["loss"], rel=1e-6)
    with torch.no_grad():
        sq_src = (model(raw["audio"]) - raw["labels"] / LABEL_SCALE).pow(2).sum()
        sq_tgt = (model(raw["target_audio"]) - raw["target_labels"] / LABEL_SCALE).pow(2).sum(dim=1)
    n = (8 + 4) * 7  # the mean divides by every label, weighted or not
    assert losses["zeros"]["loss"] == pytest.approx(sq_src.item() / n, rel=1e-5)
    want = (sq_src + (sq_tgt * torch.tensor([0.5, 0.0, 1.0, 0.25])).sum()) / n
    assert losses["half"]["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert losses["half"]["mse_target"] == pytest.approx(losses["none"]["mse_target"], rel=1e-6)  # logged unweighted


@pytest.mark.parametrize(
    "weights, match",
    [([1.0, 1.0], r"\(4,\) weights"), ([1.0, -1.0, 1.0, 1.0], ">= 0"), ([1.0, np.nan, 1.0, 1.0], "finite")],
)
def test_bad_target_weights_are_refused(weights, match):
    raw = {"target_audio": TARGET[0][:4], "target_labels": TARGET[1][:4], "target_weights": np.array(weights)}
    with pytest.raises(ValueError, match=match):
        prepare_batch(raw, "distill", "cpu")
    with pytest.raises(KeyError, match="target_weights"):
        prepare_batch({"audio": TRAIN[0][:4], "labels": TRAIN[1][:4], "target_weights": np.ones(4)}, "distill", "cpu")


def test_spread_weighting_maps_the_teacher_spread_to_exp_minus_its_square():
    from pipelines.student import spread_weighted

    batch = {"target_audio": np.zeros((3, 4)), "target_labels": np.ones((3, 7)), "target_spread": np.array([0, 1, 2])}
    out = spread_weighted(dict(batch), "spread")
    assert np.allclose(out["target_weights"], np.exp(-np.array([0.0, 1.0, 4.0])))
    assert "target_spread" not in out
    assert "target_weights" not in spread_weighted(dict(batch), "uniform")
    with pytest.raises(ValueError, match="teacher_spread"):
        spread_weighted({"target_audio": np.zeros((3, 4)), "target_labels": np.ones((3, 7))}, "spread")


def test_raw_pseudo_labels_replace_the_calibrated_ones_only_when_asked():
    from mdlda.batches import pseudo_labels

    cal, raw = np.full((3, 7), 5.0), np.full((3, 7), 7.0)
    batch = {"target_audio": np.zeros((3, 4)), "target_labels": cal, "target_labels_raw": raw}
    assert pseudo_labels(dict(batch), "raw")["target_labels"] is raw
    kept = pseudo_labels(dict(batch), "calibrated")
    assert kept["target_labels"] is cal and "target_labels_raw" not in kept
    source_only = {"audio": np.zeros((3, 4)), "labels": cal}
    assert pseudo_labels(dict(source_only), "raw") == source_only  # a source batch has no pseudo-labels to swap
    with pytest.raises(ValueError, match="labels_raw"):
        pseudo_labels({"target_audio": np.zeros((3, 4)), "target_labels": cal}, "raw")


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
        torch.manual_seed(0)
        model = TinyModel()
        plain = step(model, prepare_batch(raw, mode, "cpu"))
        wrapped = step(ForwardOnly(model), prepare_batch(raw, mode, "cpu"))  # the same weights, through forward()
        assert np.isfinite(wrapped.losses["loss"])
        assert wrapped.losses.keys() == plain.losses.keys(), mode
        for k, v in plain.losses.items():  # the wrapper changes how the model is called, not what is computed
            assert wrapped.losses[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (mode, k)


def test_supervised_step_is_mse_on_the_0_1_scale():
    torch.manual_seed(0)
    model = TinyModel()
    out = supervised_step(model, prepare_batch({"audio": TRAIN[0][:8], "labels": TRAIN[1][:8]}, "supervised", "cpu"))
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


@pytest.mark.parametrize("bn_stats", ["source", "target", "both"])
def test_bn_stats_names_the_domain_whose_passes_update_running_statistics(bn_stats):
    torch.manual_seed(0)
    model = TinyModel()
    head = DomainHead(model.embed_dim)
    src, tgt = torch.randn(8, N_SAMPLES) * 0.1, torch.randn(8, N_SAMPLES) * 2 + 1
    batch = prepare_batch({"audio": src, "labels": torch.rand(8, 7) * 9 + 1, "target_audio": tgt}, "dann", "cpu")
    model.train()
    dann_step(model, head, batch, adv_lambda=0.3, bn_stats=bn_stats)
    ref = TinyModel()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if "running" not in k}, strict=False)
    ref.train()
    with torch.no_grad():
        for x in {"source": [src], "target": [tgt], "both": [src, tgt]}[bn_stats]:
            ref.forward_features(x)  # the passes that should count, alone
    assert torch.allclose(model.bn.running_mean, ref.bn.running_mean, atol=1e-6)
    assert torch.allclose(model.bn.running_var, ref.bn.running_var, atol=1e-6)
    assert model.bn.momentum == 0.1 and int(model.bn.num_batches_tracked) == (2 if bn_stats == "both" else 1)
