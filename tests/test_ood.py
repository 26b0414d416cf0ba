"""The OOD score (mdlda.ood): its threshold's rate on the training points, shifted and noise inputs flagged, the
statistics' file round trip, and `mdlda predict` with and without statistics on a registered tiny model (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from tiny_models import one_thread  # noqa: F401  (autouse fixture: one torch thread for tiny tensors)

from mdlda import ood
from mdlda.params import FEATURES, SAMPLE_RATE, SEGMENT_SAMPLES

D = 64


def _train(n: int = 400, seed: int = 0) -> np.ndarray:
    """Gaussian 'embeddings' with unequal per-dimension scales and offsets, ReLU-like (non-negative)."""
    scale = np.random.default_rng(100).uniform(0.2, 3.0, D)  # one distribution, every seed a fresh draw of it
    return np.abs(np.random.default_rng(seed).normal(2.0, 1.0, (n, D)) * scale)


def test_the_threshold_flags_the_stated_share_of_training_points_and_few_fresh_ones():
    train = _train()
    stats = ood.fit(train)
    assert stats.quantile == ood.QUANTILE and stats.n == len(train)
    assert stats.flag(stats.score(train)).mean() == pytest.approx(1 - ood.QUANTILE, abs=0.005)
    fresh = _train(2000, seed=1)  # same distribution, not fitted
    assert stats.flag(stats.score(fresh)).mean() < 0.05
    assert 0.7 < np.median(stats.score(fresh)) < 1.3  # a typical window scores about 1


def test_shifted_and_noise_inputs_are_flagged():
    train = _train()
    stats = ood.fit(train)
    sd = train.std(axis=0)
    shifted = _train(200, seed=2) + 2 * sd  # two standard deviations off in every dimension
    noise = np.random.default_rng(3).normal(0, 10, (200, D))
    assert stats.flag(stats.score(shifted)).all()
    assert stats.flag(stats.score(noise)).all()
    assert stats.score(noise).min() > 3 * stats.threshold


def test_a_dimension_constant_in_training_does_not_dominate_the_score():
    train = _train()
    train[:, 0] = 0.0  # a ReLU unit never active on the training data
    stats = ood.fit(train)
    fresh = _train(200, seed=4)
    fresh[:, 0] = 0.01 * train[:, 1:].std()  # that unit slightly active: not by itself a foreign input
    assert stats.flag(stats.score(fresh)).mean() < 0.05
    assert np.isfinite(stats.score(fresh)).all()


def test_statistics_round_trip_through_their_file_and_a_missing_file_is_none(tmp_path):
    stats = ood.fit(_train(), source="midlevel train split")
    path = ood.save(stats, tmp_path)
    assert path.name == ood.OOD_FILE and json.loads(path.read_text())["n"] == 400
    back = ood.load(tmp_path)
    assert np.array_equal(back.mean, stats.mean) and np.array_equal(back.var, stats.var)
    assert (back.threshold, back.quantile, back.n, back.source) == (
        stats.threshold, stats.quantile, stats.n, stats.source
    )  # fmt: skip
    x = _train(5, seed=5)
    assert np.array_equal(back.score(x), stats.score(x))
    assert ood.load(tmp_path / "nothing-here") is None
    path.write_text(json.dumps({"mean": [0.0, 1.0], "var": [1.0], "threshold": 1, "quantile": 0.99, "n": 2}))
    with pytest.raises(ValueError, match="not a valid OOD statistics file"):
        ood.load(tmp_path)


def test_the_warning_counts_the_windows_above_the_threshold():
    stats = ood.fit(_train())
    t = stats.threshold
    assert ood.warning(np.array([0.5 * t, 0.9 * t]), stats) is None
    text = ood.warning(np.array([0.5 * t, 2 * t, 3 * t]), stats)
    assert text.startswith("2 of 3 windows look unlike the training data") and "not reliable" in text
    assert f"threshold {t:.2f}" in text


# -- a registered tiny model, with and without statistics ---------------------------------------------------
def _tone(freq: float, seconds: float = 15.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amp * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 2 * t))).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory, seed_store):
    """A real SQLite MLflow store: a tiny RF-ResNet registered twice from weights-only checkpoints, ``with`` its
    OOD statistics (fitted on tones) and ``without`` (a model registered before they existed)."""
    import os

    import mlflow
    from mlflow.tracking import MlflowClient

    from mdlda.checkpoints import save_model
    from mdlda.models import create_model
    from mdlda.tracking import setup_tracking

    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    work = tmp_path_factory.mktemp("work")
    seed_store(work)
    setup_tracking(work, "models")
    torch.manual_seed(0)
    model = create_model("rfresnet", width=4).eval()  # width 2 (an 8-d embedding) hardly tells noise from tones
    tones = np.stack([_tone(f) for f in np.geomspace(110, 1760, 12)])  # the 'training data'
    stats = ood.fit(ood.embed(model, [torch.from_numpy(tones)]), source="tones")
    client = MlflowClient()
    for name, with_stats in (("with", True), ("without", False)):
        ckpt = save_model(model, work / name)
        if with_stats:
            ood.save(stats, ckpt)
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(ckpt), artifact_path="model-checkpoint")
        client.create_registered_model(name)
        client.create_model_version(name, f"{run.info.artifact_uri}/model-checkpoint", run.info.run_id)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    mlflow.set_tracking_uri(None)
    yield work, stats
    mlflow.set_tracking_uri(None)
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def _invoke(args):
    from typer.testing import CliRunner

    from pipelines.cli import app

    return CliRunner().invoke(app, args)


def _files(tmp_path):
    tone, noise = tmp_path / "tone.wav", tmp_path / "noise.wav"
    sf.write(tone, _tone(330.0, 30.0), SAMPLE_RATE)
    sf.write(noise, np.random.default_rng(0).uniform(-1, 1, 2 * SEGMENT_SAMPLES).astype(np.float32), SAMPLE_RATE)
    return tone, noise


def test_predict_scores_every_window_and_warns_once_about_noise(store, tmp_path):
    work, stats = store
    tone, noise = _files(tmp_path)
    out = tmp_path / "pred.csv"
    res = _invoke(
        ["predict", str(tone), str(noise), "--model", "models:/with/1", "--workdir", str(work), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["file", "start_s", "end_s", *FEATURES, "ood_score", "ood_flag"]
    tone_rows, noise_rows = frame[frame.file == str(tone)], frame[frame.file == str(noise)]
    assert not tone_rows.ood_flag.any() and noise_rows.ood_flag.all()
    assert (noise_rows.ood_score > stats.threshold).all()
    warnings = [line for line in res.output.splitlines() if "look unlike the training data" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: 2 of {len(frame)} windows"), res.output


def test_a_model_registered_without_statistics_still_predicts_with_a_notice(store, tmp_path):
    from mdlda.served import load_served_with_ood

    work, _ = store
    tone, _ = _files(tmp_path)
    out = tmp_path / "pred.csv"
    res = _invoke(["predict", str(tone), "--model", "models:/without/1", "--workdir", str(work), "--out", str(out)])
    assert res.exit_code == 0, res.output
    frame = pd.read_csv(out)
    assert (
        list(frame.columns) == ["file", "start_s", "end_s", *FEATURES]
        and np.isfinite(frame[list(FEATURES)]).all().all()
    )
    notes = [line for line in res.output.splitlines() if "no training-data statistics" in line]
    assert len(notes) == 1 and "ood_score" in notes[0], res.output
    import mlflow

    from mdlda.tracking import use_tracking

    use_tracking(work)
    try:
        model, stats = load_served_with_ood("models:/without/1")
        assert stats is None and model(torch.zeros(1, SEGMENT_SAMPLES)).shape == (1, len(FEATURES))
    finally:
        mlflow.set_tracking_uri(None)


def test_compare_reports_each_performances_distance(store, tmp_path):
    from mdlda.compare import compare
    from mdlda.served import load_served_with_ood
    from mdlda.tracking import use_tracking

    work, _ = store
    tone, noise = _files(tmp_path)
    use_tracking(work)
    try:
        model, stats = load_served_with_ood("models:/with/1")
    finally:
        import mlflow

        mlflow.set_tracking_uri(None)
    result = compare(model, [tone, noise], tmp_path / "cmp", hop_s=15.0, ood=stats)
    table = pd.read_csv(result.files["ood"]).set_index("performance")
    assert table.loc["tone", "flagged"] == 0 and table.loc["noise", "flagged"] == table.loc["noise", "windows"] == 2
    assert table.loc["noise", "max_score"] > stats.threshold > table.loc["tone", "max_score"]
    summary = result.files["summary"].read_text()
    assert "| noise | 2 of 2 |" in summary and "| tone | 0 of 2 |" in summary
    assert compare(model, [tone, noise], None, hop_s=15.0).ood is None  # no statistics, no table
