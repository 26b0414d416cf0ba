"""The output calibration: the fitted map, and fit() storing it in the kept weights."""

import numpy as np
import pytest
import torch
from tiny_models import batches_of, one_thread, quick  # noqa: F401  (autouse fixture)

from mdlda.calibration import MIN_SLOPE, fit_output_affine
from mdlda.checkpoints import seed_everything
from mdlda.metrics import pearson_r, rmse
from mdlda.training import fit


def _overspread(n=200, spread=3.0, seed=0):
    g = np.random.default_rng(seed)
    y = g.normal(5.5, 1.5, (n, 7))
    pred = 4.0 + spread * (y - 5.5) + g.normal(0, 3.0, (n, 7))  # offset, too wide, noisy
    return pred, y


def test_an_overspread_offset_model_is_shrunk_and_shifted_and_keeps_every_r():
    pred, y = _overspread()
    slope, shift = fit_output_affine(pred, y)
    cal = slope * pred + shift
    assert 0.1 < slope < 0.5
    np.testing.assert_allclose(cal.mean(axis=0), y.mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(pearson_r(y, cal), pearson_r(y, pred), atol=1e-12)
    assert rmse(y, cal).mean() < 0.5 * rmse(y, pred).mean()
    assert rmse(y, cal).mean() < rmse(y, np.broadcast_to(y.mean(axis=0), y.shape)).mean()


def test_the_level_comes_from_the_training_labels_when_given():
    pred, y = _overspread()
    level = np.full(7, 6.0)
    slope, shift = fit_output_affine(pred, y, level)
    assert slope == fit_output_affine(pred, y)[0]  # the slope is the validation data's either way
    np.testing.assert_allclose((slope * pred + shift).mean(axis=0), level, atol=1e-9)


def test_the_slope_never_widens_and_never_reaches_zero():
    g = np.random.default_rng(1)
    y = g.normal(5, 2, (50, 7))
    narrow = 5 + 0.2 * (y - 5)  # a perfect model with too little spread: no widening
    assert fit_output_affine(narrow, y)[0] == 1.0
    assert fit_output_affine(-y, y)[0] == MIN_SLOPE  # anti-correlated: kept ordered, almost the mean
    assert fit_output_affine(np.ones((50, 7)), y)[0] == MIN_SLOPE  # constant outputs
    slope, shift = fit_output_affine(y[:1], y[:1])  # one row: nothing to fit
    assert slope == 1.0 and not shift.any()
    with pytest.raises(ValueError, match="one shape"):
        fit_output_affine(y[:, :6], y)


def _fit_rfresnet(calibrate: str):
    from mdlda.models import create_model

    seed_everything(0)
    model = create_model("rfresnet", width=4)
    g = torch.Generator().manual_seed(0)
    audio, labels = torch.randn(16, 22050 * 2, generator=g) * 0.1, torch.rand(16, 7, generator=g) * 9 + 1
    train, val = batches_of(audio[:8], labels[:8], size=4), batches_of(audio[8:], labels[8:], size=4)
    result = fit(model, lambda e: train, lambda: val, quick(max_epochs=3, calibrate=calibrate))
    return model, result, (audio[8:], labels[8:], labels[:8])


def _scores(model, audio, labels):
    model.eval()
    with torch.no_grad():
        pred = (model(audio) * 10).numpy()
    return pearson_r(labels.numpy(), pred), rmse(labels.numpy(), pred).mean()


def test_fit_stores_the_kept_epochs_calibration_in_the_returned_weights():
    raw_model, raw, (audio, labels, train_labels) = _fit_rfresnet("none")
    model, result = _fit_rfresnet("affine")[:2]
    assert raw.best_epoch == result.best_epoch  # training itself is untouched
    assert torch.equal(raw_model.output_scale, torch.ones(7)) and not raw_model.output_shift.any()
    best = result.history[result.best_epoch]
    slope = best["valid_calibration_slope"]
    assert torch.allclose(model.output_scale, torch.full((7,), slope))
    assert torch.equal(result.best_state_dict["output_scale"], model.output_scale)
    r_raw, rmse_raw = _scores(raw_model, audio, labels)
    r_cal, rmse_cal = _scores(model, audio, labels)
    np.testing.assert_allclose(r_cal, r_raw, atol=1e-4)
    assert rmse_cal < 0.8 * rmse_raw  # 3 epochs on noise: the raw outputs are offset, the shift takes it out
    assert best["valid_calibrated_rmse_mean"] == pytest.approx(rmse_cal, rel=1e-4)
    model.eval()
    with torch.no_grad():  # centred on the training labels' mean, not the validation labels'
        np.testing.assert_allclose(model(audio).mean(0) * 10, train_labels.mean(0), atol=1e-4)


def test_a_warm_start_from_a_calibrated_model_trains_on_raw_outputs():
    from mdlda.models import create_model

    model, _, (audio, labels, _) = _fit_rfresnet("affine")
    assert model.output_shift.any()
    warm = create_model("rfresnet", width=4)
    warm.load_state_dict(model.state_dict())
    one = batches_of(audio, labels, size=4)
    fit(warm, lambda e: one, lambda: one, quick(max_epochs=1, calibrate="none"))
    assert torch.equal(warm.output_scale, torch.ones(7)) and not warm.output_shift.any()


def test_weights_saved_before_the_calibration_existed_load_as_the_identity():
    from mdlda.models import create_model

    model = create_model("rfresnet", width=4)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("output_")}
    model.set_output_calibration(0.5, torch.ones(7))
    model.load_state_dict(old)
    assert torch.equal(model.output_scale, torch.ones(7)) and not model.output_shift.any()


def test_the_served_model_maps_its_ratings_back_to_the_raw_head():
    """What the pseudo-labels' ``labels_raw`` column holds: a teacher's ratings before its calibration."""
    from mdlda.models import create_model
    from mdlda.tracking import RatingModel

    seed_everything(0)
    model = create_model("rfresnet", width=4).eval()
    audio = torch.randn(3, 22050 * 2, generator=torch.Generator().manual_seed(1)) * 0.1
    served = RatingModel(model)
    with torch.no_grad():
        raw = served(audio)
        model.set_output_calibration(0.4, torch.linspace(-0.1, 0.2, 7))
        rated = served(audio)
        assert not torch.allclose(rated, raw, atol=1e-3)  # the calibration moved the ratings
        assert torch.allclose(served.uncalibrated(rated), raw, atol=1e-4)
