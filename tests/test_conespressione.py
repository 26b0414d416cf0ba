"""The Con Espressione check on a generated set: CSV validation, audio matching, piece-exclusive folds, and the
numbers in the written outputs recomputed independently (numpy least squares, np.corrcoef, the t distribution).
One test runs the command end to end with a tiny model registered in a real MLflow store in tmp_path.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import typer
from scipy import stats
from tiny_models import one_thread  # noqa: F401  (autouse fixture: one torch thread for tiny tensors)
from typer.testing import CliRunner

from mdlda.conespressione import (
    ConEspressioneError,
    check_groups,
    correlation_table,
    piece_folds,
    regression_table,
)
from mdlda.datasets.common import DatasetFormatError
from mdlda.datasets.conespressione import (
    DIMENSIONS,
    audio_descriptors,
    generate_conespressione_demo,
    match_audio,
    read_dimensions,
)
from mdlda.params import FEATURES
from pipelines.cli.conespressione import register


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """4 pieces x 4 performers, ~16 s each (2 windows): 16 performances, 12 in each training fold."""
    return generate_conespressione_demo(
        tmp_path_factory.mktemp("ce"), seed=3, pieces=4, performers=4, seconds=(15.5, 16.5)
    )


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def _text(result) -> str:
    return " ".join(result.output.split())


def _write(tmp_path, frame: pd.DataFrame, name: str = "dims.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def _ols_r2(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    a = np.column_stack([x, np.ones(len(x))])
    coef = np.linalg.lstsq(a[train], y[train], rcond=None)[0]
    return a[test] @ coef


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    return 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2)


def _p_two_sided(r: float, n: int) -> float:
    t = r * np.sqrt((n - 2) / (1 - r * r))
    return float(2 * stats.t.sf(abs(t), n - 2))


# ---------------------------------------------------------------------------------------------- the CSV format


def test_demo_csv_is_valid_and_its_dimensions_are_measured_audio_properties(tmp_path, demo):
    dims = read_dimensions(demo["dims_csv"])
    assert len(dims) == 16 and dims["piece_name"].nunique() == 4
    assert list(dims.columns[:6]) == ["performance_name", "piece_name", *DIMENSIONS]
    items, skipped = match_audio(demo["audio_dir"], dims)
    assert len(items) == 16 and skipped == []
    from mdlda.audio import load

    measured = pd.DataFrame([audio_descriptors(load(p), 22_050) for p in items["path"]])
    for dim, col in zip(DIMENSIONS, ["loudness_db", "detachment", "brightness_hz", "dynamic_range_db"], strict=True):
        assert np.corrcoef(items[dim], measured[col])[0, 1] > 0.8, dim
    # The documented pattern finds the same pieces as the piece_name column.
    by_pattern = read_dimensions(_write(tmp_path, dims.drop(columns="piece_name")), demo["piece_pattern"])
    assert list(by_pattern["piece_name"]) == list(dims["piece_name"])


def test_missing_columns_are_all_named(tmp_path, demo):
    dims = pd.read_csv(demo["dims_csv"]).drop(columns=["dim_2", "dim_4"])
    with pytest.raises(DatasetFormatError, match=r"missing column\(s\) dim_2, dim_4"):
        read_dimensions(_write(tmp_path, dims))
    with pytest.raises(DatasetFormatError, match=r"missing column\(s\) dim_2 \(did you mean 'Dim2'\?\), dim_4 \("):
        read_dimensions(_write(tmp_path, dims.assign(Dim2=1.0)))
    with pytest.raises(DatasetFormatError, match=r"missing column\(s\) piece_name.*piece pattern"):
        read_dimensions(_write(tmp_path, pd.read_csv(demo["dims_csv"]).drop(columns="piece_name")))
    with pytest.raises(DatasetFormatError, match="piece_name column and a piece pattern"):
        read_dimensions(demo["dims_csv"], piece_pattern=r"^\d+_(?P<piece>[^_]+)_")
    # Headers are matched case- and space-insensitively.
    renamed = pd.read_csv(demo["dims_csv"]).rename(columns={"dim_3": " Dim 3", "performance_name": "Performance_Name"})
    assert list(read_dimensions(_write(tmp_path, renamed))["dim_3"]) == list(pd.read_csv(demo["dims_csv"])["dim_3"])


@pytest.mark.parametrize("bad", ["", "nan", "NA", "loud"])
def test_missing_or_non_numeric_values_name_the_performance(tmp_path, demo, bad):
    dims = pd.read_csv(demo["dims_csv"], dtype=str)
    dims.loc[4, "dim_3"] = bad
    with pytest.raises(
        DatasetFormatError, match=rf"dim_3 is missing, NaN or not a number for '{dims.loc[4, 'performance_name']}'"
    ):
        read_dimensions(_write(tmp_path, dims))


def test_duplicate_performance_names_are_refused(tmp_path, demo):
    dims = pd.read_csv(demo["dims_csv"])
    dims = pd.concat([dims, dims.iloc[[2]]])
    with pytest.raises(DatasetFormatError, match=f"duplicate performance_name '{dims.iloc[2].performance_name}'"):
        read_dimensions(_write(tmp_path, dims))
    result = CliRunner().invoke(
        _app(), ["conespressione", demo["audio_dir"], "--dims", str(tmp_path / "dims.csv"), "--workdir", str(tmp_path)]
    )
    assert result.exit_code == 1 and "duplicate performance_name" in _text(result)


def test_missing_stray_and_ambiguous_audio_are_reported(tmp_path, demo):
    audio = tmp_path / "audio"
    audio.mkdir()
    dims = read_dimensions(demo["dims_csv"])
    names = list(dims["performance_name"])
    for name in names[1:]:
        (audio / f"{name}.wav").symlink_to(f"{demo['audio_dir']}/{name}.wav")
    (audio / "stray_take.wav").symlink_to(f"{demo['audio_dir']}/{names[1]}.wav")
    (audio / "sub").mkdir()
    (audio / "sub" / f"{names[2]}.flac").write_bytes(b"")  # a second file with the same stem
    items, skipped = match_audio(audio, dims)
    assert set(items["performance_name"]) == set(names) - {names[0], names[2]}
    reasons = {s["item"]: s for s in skipped}
    assert "no audio file" in reasons[names[0]]["reason"] and reasons[names[0]]["counts_as_failure"]
    assert "ambiguous" in reasons[names[2]]["reason"]
    assert not reasons["stray_take.wav"]["counts_as_failure"]


# ------------------------------------------------------------------------------------------------ the analysis


def test_folds_never_share_a_piece():
    rng = np.random.default_rng(0)
    for n_pieces, want in ((2, 2), (3, 3), (7, 5)):
        groups = np.array([f"p{i}" for i in rng.integers(0, n_pieces, 40)])
        groups[:n_pieces] = [f"p{i}" for i in range(n_pieces)]
        folds = piece_folds(groups)
        assert len(folds) == want
        assert sorted(np.concatenate([test for _, test in folds])) == list(range(40))
        for train, test in folds:
            assert not set(groups[train]) & set(groups[test])


def test_fewer_than_two_pieces_are_refused(tmp_path, demo):
    dims = read_dimensions(demo["dims_csv"])
    one = dims[dims["piece_name"] == dims["piece_name"].iloc[0]]
    with pytest.raises(ConEspressioneError, match="at least 2 pieces"):
        check_groups(one)
    result = CliRunner().invoke(
        _app(), ["conespressione", demo["audio_dir"], "--dims", str(_write(tmp_path, one)), "--workdir", str(tmp_path)]
    )
    assert result.exit_code == 1 and "at least 2 pieces" in _text(result)


def test_regression_and_correlations_on_known_relations():
    rng = np.random.default_rng(1)
    n = 30
    feats = pd.DataFrame(rng.normal(5, 1, (n, 7)), columns=list(FEATURES))
    feats.insert(0, "piece_name", [f"piece{i % 6}" for i in range(n)])
    feats.insert(0, "performance_name", [f"perf{i}" for i in range(n)])
    feats.insert(0, "model", "m")
    x = feats[list(FEATURES)].to_numpy()
    dims = feats[["performance_name", "piece_name"]].copy()
    dims["dim_1"] = x @ np.arange(1, 8) + 2.0  # exactly linear in the features
    dims["dim_2"] = x[:, 4] + 0.3 * rng.normal(size=n)  # dissonance and little else
    dims["dim_3"] = rng.normal(size=n)
    dims["dim_4"] = -x[:, 0] + rng.normal(size=n)
    reg = regression_table(feats, dims).set_index("dimension")
    assert reg.loc["dim_1", "r2_in_sample"] == pytest.approx(1.0) and reg.loc["dim_1", "r2_cv"] == pytest.approx(1.0)
    assert reg.loc["dim_3", "r2_cv"] < reg.loc["dim_3", "r2_in_sample"]  # noise fits in sample only
    corr = correlation_table(feats, dims)
    sig = corr[corr["significant"] & (corr["dimension"] == "dim_2")]
    assert list(sig["feature"]) == ["dissonance"] and sig["r"].iloc[0] > 0.9


# ------------------------------------------------------------------------------------------- end to end (MLflow)


@pytest.fixture()
def clean_mlflow(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    import mlflow

    mlflow.set_tracking_uri(None)


@pytest.mark.slow  # the whole command on a generated set
def test_command_end_to_end_outputs_match_independent_recomputation(
    tmp_path, demo, monkeypatch, clean_mlflow, seed_store
):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from mdlda.checkpoints import save_model
    from mdlda.models import create_model
    from mdlda.predict import predict_recording, time_average
    from mdlda.tracking import CHAMPION, STUDENT_MODEL, RatingModel, setup_tracking

    work = tmp_path / "work"
    seed_store(work)
    setup_tracking(work, "models")
    torch.manual_seed(0)
    model = create_model("rfresnet", width=4)
    # registered as the weights-only checkpoint the command loads (log_model's pt2 export, seconds of CPU, is
    # tested with the served path in test_served.py and test_serve.py)
    ckpt = save_model(model, tmp_path / "ckpt")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(ckpt), artifact_path="model-checkpoint")
    client = MlflowClient()
    client.create_registered_model(STUDENT_MODEL)
    v = client.create_model_version(STUDENT_MODEL, f"{run.info.artifact_uri}/model-checkpoint", run.info.run_id)
    client.set_registered_model_alias(STUDENT_MODEL, CHAMPION, v.version)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the command finds the store through --workdir

    dims = pd.read_csv(demo["dims_csv"])
    ghost = dims.iloc[[0]].assign(performance_name="99_Ghost_Nobody")
    dims_csv = _write(tmp_path, pd.concat([dims, ghost]))
    out = tmp_path / "out"
    args = ["conespressione", demo["audio_dir"], "--dims", str(dims_csv), "--workdir", str(work), "--out", str(out)]
    result = CliRunner().invoke(_app(), [*args, "--log-to-mlflow"])
    assert result.exit_code == 0, result.output
    text = _text(result)
    assert "1 item(s) skipped" in text and "99_Ghost_Nobody: no audio file" in text
    assert pd.read_csv(out / "skipped.csv")["item"].tolist() == ["99_Ghost_Nobody"]

    # Features: the registered model's time-averaged prediction per performance (the module it was saved from
    # gives the same numbers; loading the registry copy a second time would cost seconds).
    features = pd.read_csv(out / "features.csv")
    assert len(features) == 16 and set(features["model"]) == {"student"}
    for row in features.iloc[[0, -1]].itertuples(index=False):
        path = f"{demo['audio_dir']}/{row.performance_name}.wav"
        expect = time_average(predict_recording(RatingModel(model).eval(), path)).iloc[0]
        assert np.allclose([getattr(row, f) for f in FEATURES], [expect[f] for f in FEATURES], rtol=1e-4, atol=1e-3)

    data = features.merge(dims, on=["performance_name", "piece_name"])
    x = data[list(FEATURES)].to_numpy()
    groups = data["piece_name"].to_numpy()
    reg = pd.read_csv(out / "regression.csv").set_index("dimension")
    corr = pd.read_csv(out / "correlations.csv")
    everything = np.arange(len(x))
    folds = piece_folds(groups)
    assert len(folds) == 4 and all(not set(groups[a]) & set(groups[b]) for a, b in folds)
    for dim in DIMENSIONS:
        y = data[dim].to_numpy()
        assert reg.loc[dim, "r2_in_sample"] == pytest.approx(_r2(y, _ols_r2(x, y, everything, everything)), abs=1e-4)
        oof = np.empty_like(y)
        for train, test in folds:
            oof[test] = _ols_r2(x, y, train, test)
        assert reg.loc[dim, "r2_cv"] == pytest.approx(_r2(y, oof), abs=1e-3)
        for j, feature in enumerate(FEATURES):
            row = corr[(corr["feature"] == feature) & (corr["dimension"] == dim)].iloc[0]
            r = np.corrcoef(x[:, j], y)[0, 1]
            assert row["r"] == pytest.approx(r, abs=1e-5)
            assert row["p"] == pytest.approx(_p_two_sided(r, len(y)), rel=1e-3, abs=1e-9)
            assert bool(row["significant"]) == (_p_two_sided(r, len(y)) < 0.05 and abs(r) > 0.2)

    # The markdown lists exactly the significant pairs; the figure is a PNG; MLflow holds the outputs.
    md = (out / "significant.md").read_text()
    sig = corr[corr["significant"]]
    listed = re.findall(r"^\| (dim_\d) \| ([a-z ]+) \| [+-]", md, flags=re.M)
    assert sorted(listed) == sorted(zip(sig["dimension"], sig["feature"].str.replace("_", " "), strict=True))
    assert (out / "correlations.png").read_bytes()[:4] == b"\x89PNG"
    exp = client.get_experiment_by_name("conespressione")
    run = client.search_runs([exp.experiment_id])[0]
    assert run.data.metrics["student.dim_1.r2_cv"] == pytest.approx(reg.loc["dim_1", "r2_cv"], abs=1e-5)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "conespressione")}
    assert {"conespressione/regression.csv", "conespressione/significant.md"} <= logged
