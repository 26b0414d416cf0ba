import numpy as np
import pytest
import torch
from scipy import stats

from mdlda.metrics import (
    domain_accuracy,
    domain_discrepancy,
    in_scale,
    level_offsets,
    pearson_r,
    rating_metrics,
    regression_metrics,
    rmse,
)
from mdlda.params import FEATURES


def _ratings(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.uniform(1, 10, size=(n, len(FEATURES)))
    pred = y + rng.normal(0, np.linspace(0.5, 6, len(FEATURES)), size=y.shape)  # r falls feature by feature
    return y, pred


def test_regression_metrics_match_scipy_and_numpy():
    y, pred = _ratings()
    m = regression_metrics(y, pred)
    rs, errs = [], []
    for j, name in enumerate(FEATURES):
        r = stats.pearsonr(y[:, j], pred[:, j]).statistic
        e = np.sqrt(np.mean((y[:, j] - pred[:, j]) ** 2))
        assert m[f"r_{name}"] == pytest.approx(r, abs=1e-12)
        assert m[f"rmse_{name}"] == pytest.approx(e, abs=1e-12)
        rs.append(r)
        errs.append(e)
    assert m["r_mean"] == pytest.approx(np.mean(rs), abs=1e-12)
    assert m["rmse_mean"] == pytest.approx(np.mean(errs), abs=1e-12)
    assert set(m) == {f"{k}_{f}" for k in ("r", "rmse") for f in (*FEATURES, "mean")}
    assert all(type(v) is float for v in m.values())


def test_level_offsets_are_the_level_part_of_the_rmse():
    y, pred = _ratings()
    shift = np.array([1.5, -0.5, 0.0, 0.25, -2.0, 0.0, 1.0])
    m = level_offsets(y, pred + shift)
    base = level_offsets(y, pred)
    for j, name in enumerate(FEATURES):
        assert m[f"offset_{name}"] == pytest.approx(base[f"offset_{name}"] + shift[j], abs=1e-12)
        # RMSE^2 = offset^2 + the squared error about the means, so a shift moves the RMSE but never r
        centred = (pred + shift)[:, j] - m[f"offset_{name}"]
        e2 = rmse(y, pred + shift)[j] ** 2
        assert e2 == pytest.approx(m[f"offset_{name}"] ** 2 + np.mean((centred - y[:, j]) ** 2), rel=1e-9)
    assert m["offset_mean"] == pytest.approx(np.mean(np.abs([m[f"offset_{f}"] for f in FEATURES])))
    assert regression_metrics(y, pred + shift)["r_mean"] == pytest.approx(regression_metrics(y, pred)["r_mean"])
    with pytest.raises(ValueError, match="differ in shape"):
        level_offsets(y, pred[:3])


def test_rating_metrics_are_r_rmse_offsets_and_the_share_on_the_scale():
    y, pred = _ratings()
    pred[:4, 0] = [0.5, 10.5, 1.0, 10.0]  # two outside 1..10, the bounds themselves inside
    m = rating_metrics(y, pred)
    assert m == regression_metrics(y, pred) | level_offsets(y, pred) | {"in_scale": in_scale(pred)}
    inside = ((pred >= 1) & (pred <= 10)).sum()
    assert m["in_scale"] == pytest.approx(inside / pred.size) and inside < pred.size


def test_metrics_accept_tensors_and_are_scale_aware():
    y, pred = _ratings()
    m = regression_metrics(torch.from_numpy(y).float(), torch.from_numpy(pred).float())
    m10 = regression_metrics(y / 10, pred / 10)
    assert m["r_mean"] == pytest.approx(m10["r_mean"], abs=1e-6)  # r ignores the scale
    assert m["rmse_mean"] == pytest.approx(10 * m10["rmse_mean"], rel=1e-5)  # RMSE is in input units


def test_constant_prediction_gives_zero_r_not_nan():
    y, pred = _ratings()
    pred[:, 2] = 5.5
    m = regression_metrics(y, pred)
    assert m["r_rhythm_complexity"] == 0.0
    assert m["r_melodiousness"] == pytest.approx(stats.pearsonr(y[:, 0], pred[:, 0]).statistic)
    assert regression_metrics(y, np.full_like(y, 3.0))["r_mean"] == 0.0
    # a constant column with float round-off is still constant
    assert pearson_r(y[:, 0], np.full(len(y), 0.1) * 3)[0] == 0.0


def test_non_finite_predictions_are_not_hidden():
    y, pred = _ratings()
    pred[3, 1] = np.nan
    m = regression_metrics(y, pred)
    assert np.isnan(m["r_articulation"]) and np.isnan(m["rmse_articulation"]) and np.isnan(m["r_mean"])
    assert np.isfinite(m["r_melodiousness"])


def test_perfect_and_anti_correlation():
    y, _ = _ratings()
    assert pearson_r(y, 2 * y + 1) == pytest.approx(np.ones(len(FEATURES)))
    assert pearson_r(y, -y) == pytest.approx(-np.ones(len(FEATURES)))
    assert rmse(y, y) == pytest.approx(np.zeros(len(FEATURES)))


def test_shape_errors():
    y, pred = _ratings()
    with pytest.raises(ValueError, match="shape"):
        regression_metrics(y, pred[:-1])
    with pytest.raises(ValueError, match="7 feature columns"):
        regression_metrics(y[:, :3], pred[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        regression_metrics(y[:1], pred[:1])


def test_domain_discrepancy_is_the_distance_between_means():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(30, 16))
    t = rng.normal(size=(20, 16)) + 0.5
    assert domain_discrepancy(s, t) == pytest.approx(np.linalg.norm(s.mean(0) - t.mean(0)))
    assert domain_discrepancy(s, s[::-1]) == pytest.approx(0.0, abs=1e-12)
    shift = np.zeros(16)
    shift[[0, 3]] = [3.0, 4.0]
    assert domain_discrepancy(s, s + shift) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="sizes differ"):
        domain_discrepancy(s, t[:, :8])


def test_domain_accuracy():
    logits = np.array([2.0, -1.0, 0.5, -3.0, 0.0])
    labels = np.array([1, 0, 0, 0, 1])  # a logit > 0 predicts 1; 0.0 predicts 0
    assert domain_accuracy(logits, labels) == pytest.approx(3 / 5)
    assert domain_accuracy(torch.tensor([1.0, -1.0]), torch.tensor([1.0, 0.0])) == 1.0
    with pytest.raises(ValueError):
        domain_accuracy(logits, labels[:-1])
