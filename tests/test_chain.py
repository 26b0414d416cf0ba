"""The whole chain on a local Ray with the tiny generated dataset: registry, nesting, NaN trials, reruns."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_chain import K

from mdlda.manifest import DATA_DIR

pytestmark = pytest.mark.slow


def _client(result):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(result.tracking_uri)
    return MlflowClient(result.tracking_uri)


def test_registry_holds_k_tagged_teachers(chain):
    first, _ = chain
    client = _client(first)
    versions = client.search_model_versions("name='mdlda-teacher'")
    assert len(versions) == K
    ranks = sorted(int(v.tags["rank"]) for v in versions)
    assert ranks == list(range(1, K + 1))
    for v in versions:
        assert {"sweep_id", "rank", "val_r_mean", "trial_id"} <= set(v.tags)
        assert np.isfinite(float(v.tags["val_r_mean"]))
    scores = [float(v.tags["val_r_mean"]) for v in sorted(versions, key=lambda v: int(v.tags["rank"]))]
    assert scores == sorted(scores, reverse=True)


def test_diverged_trial_failed_and_never_selected(chain):
    import pandas as pd

    first, _ = chain
    client = _client(first)
    exp = client.get_experiment_by_name("mdlda-test-chain")
    stage = client.search_runs([exp.experiment_id], "tags.`mdlda.stage` = 'teachers'")[0]
    path = client.download_artifacts(stage.info.run_id, "selection.csv")
    table = pd.read_csv(path)
    assert len(table) == 3
    bad = table[table.status == "error"]
    assert len(bad) == 1 and "diverged" in bad.error.iloc[0].lower()
    selected = {v.tags["trial_id"] for v in client.search_model_versions("name='mdlda-teacher'")}
    assert bad.trial_id.iloc[0] not in selected
    # the failed trial's MLflow run ended FAILED
    trial_runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{stage.info.run_id}'")
    statuses = {
        r.data.tags.get("trial_name", "").split("_")[-2]
        + "_"
        + r.data.tags.get("trial_name", "").split("_")[-1]: r.info.status
        for r in trial_runs
    }
    assert statuses[bad.trial_id.iloc[0]] == "FAILED"


def test_runs_are_nested(chain):
    first, _ = chain
    client = _client(first)
    exp = client.get_experiment_by_name("mdlda-test-chain")
    stages = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{first.parent_run_id}'")
    names = {r.data.tags.get("mdlda.stage") for r in stages}
    assert {
        "prepare",
        "baseline:baseline-rfresnet",
        "teachers",
        "pseudolabel",
        "student",
        "evaluate",
    } <= names
    teacher_stage = next(r for r in stages if r.data.tags.get("mdlda.stage") == "teachers")
    trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{teacher_stage.info.run_id}'")
    assert len(trials) == 3
    assert all("valid_r_mean" in t.data.metrics for t in trials if t.info.status == "FINISHED")
    assert all("lr" in t.data.params for t in trials)


def test_student_is_champion_and_predicts(chain):
    import mlflow
    import torch

    first, _ = chain
    client = _client(first)
    champ = client.get_model_version_by_alias("mdlda-student", "champion")
    assert first.student["version"] == champ.version
    model = mlflow.pytorch.load_model("models:/mdlda-student@champion")
    audio = torch.from_numpy(np.random.default_rng(0).uniform(-0.3, 0.3, (3, 330_750)).astype(np.float32))
    out = model(audio)
    assert tuple(out.shape) == (3, 7) and torch.isfinite(out).all()


def test_registered_models_carry_ood_statistics_that_flag_noise(chain):
    """Teachers, baseline and student are registered with their embedding's statistics on the source training
    split (ood.json in the weights-only checkpoint): `mdlda predict` scores windows with them."""
    import torch

    from mdlda.manifest import read_manifest
    from mdlda.served import load_served_with_ood

    first, _ = chain
    _client(first)
    n_train = read_manifest(os.path.join(first.workdir, "shards", "midlevel"))["counts"]["train"]
    noise = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 330_750)).astype(np.float32))
    for uri in ("models:/mdlda-student@champion", first.teachers[0]["uri"], "models:/mdlda-baseline/1"):
        model, stats = load_served_with_ood(uri)
        assert stats is not None and stats.n == n_train and len(stats.mean) == model.model.embed_dim, uri
        with torch.no_grad():
            _, feats = model.rate_and_embed(noise)
        assert stats.flag(stats.score(feats.numpy())).all(), uri


def test_pseudolabels(chain):
    first, _ = chain
    out = os.path.join(first.workdir, "shards", "pseudolabels")
    cols = ["clip_id", "labels", "teacher_spread", "labels_raw"]
    table = pq.read_table(os.path.join(out, DATA_DIR), columns=cols).to_pandas()
    assert len(table) == 4 and table.clip_id.is_unique
    # stored in clip-id order, whatever order the actors finished in: the student's seeded batches are drawn over
    # row positions, so the same pseudo-labels train the same student
    assert table.clip_id.is_monotonic_increasing
    for name in ("labels", "labels_raw"):  # the calibrated and the raw teacher mean, both clipped to the scale
        labels = np.stack(table[name].to_numpy())
        assert labels.shape == (4, 7) and labels.min() >= 1.0 and labels.max() <= 10.0, name
    assert (table.teacher_spread >= 0).all()


def test_a_segments_pseudo_label_does_not_depend_on_its_batch(chain):
    """The teacher actor pads a short batch to its batch size: the same segment gets bit-identical labels alone
    and among others, in any position (Ray Data's blocks decide which rows share a batch)."""
    import pyarrow as pa

    from pipelines.pseudolabel import TeacherEnsemble

    first, _ = chain
    uris = [f"models:/mdlda-teacher/{v.version}" for v in _client(first).search_model_versions("name='mdlda-teacher'")]
    maestro = os.path.join(first.workdir, "shards", "maestro", DATA_DIR)
    table = pq.read_table(maestro, columns=["clip_id", "audio"]).slice(0, 4)
    actor = TeacherEnsemble(uris, first.tracking_uri, batch_size=4)
    together = actor(table)
    for i in range(4):
        alone = actor(table.slice(i, 1))
        for name in ("labels", "labels_raw"):
            assert alone.column(name).to_pylist() == together.column(name).to_pylist()[i : i + 1], (i, name)
    reordered = actor(pa.concat_tables([table.slice(3, 1), table.slice(0, 3)]))
    assert reordered.column("labels").to_pylist()[1:] == together.column("labels").to_pylist()[:3]


def test_summary_covers_every_model(chain):
    first, _ = chain
    models = set(first.summary.model)
    assert {"baseline-rfresnet", "student", "teacher-ensemble"} | {f"teacher-{i}" for i in range(1, K + 1)} <= models
    assert set(first.summary.split) == {"test", "piano_test"}


def test_rerun_does_no_work(chain):
    first, second = chain
    assert any(first.did_work.values())
    assert not any(second.did_work.values()), second.did_work
    assert second.student["version"] == first.student["version"]
    assert [t["version"] for t in second.teachers] == [t["version"] for t in first.teachers]


def test_results_table_is_recomputed_from_the_predictions(chain):
    """Numbers are computed, never copied: recompute r and RMSE from predictions.csv with scipy."""
    import pandas as pd
    from scipy.stats import pearsonr

    from mdlda.params import FEATURES

    first, _ = chain
    out = os.path.join(first.workdir, "results", "latest")
    results = pd.read_csv(os.path.join(out, "results.csv"))
    preds = pd.read_csv(os.path.join(out, "predictions.csv"))
    for row in results.itertuples():
        p = preds[(preds.model == row.model) & (preds.split == row.split)]
        assert len(p) == row.n
        # the predictions are float32, written as their shortest repr: read back as float32 they are the very
        # numbers the table was computed from (read as float64 they differ in the 8th digit, and r of near-constant
        # predictions of a 2-epoch model moved by 1e-6)
        cols = [c for c in p.columns if c.startswith(("true_", "pred_"))]
        p = p.astype(dict.fromkeys(cols, np.float32)).astype(dict.fromkeys(cols, np.float64))
        rs = [pearsonr(p[f"true_{f}"], p[f"pred_{f}"])[0] for f in FEATURES]
        rmse = [np.sqrt(np.mean((p[f"true_{f}"] - p[f"pred_{f}"]) ** 2)) for f in FEATURES]
        assert row.r_mean == pytest.approx(np.mean(rs), abs=1e-6)
        assert row.rmse_mean == pytest.approx(np.mean(rmse), abs=1e-5)
    disc = pd.read_csv(os.path.join(out, "discrepancy.csv"))
    assert set(disc.model) == set(results.model) - {"teacher-ensemble"}
    assert (disc.discrepancy > 0).all()
    for png in ("mean_r.png", "features.png", "discrepancy.png"):
        assert os.path.getsize(os.path.join(out, png)) > 5_000


def test_select_only_returns_the_versions_the_sweep_registered(chain):
    """`mdlda teachers --select-only` ranks the stored sweep with the sweep's own selection: same versions and
    ranks, same tags, no new version."""
    from tiny_chain import tiny_chain_config

    from pipelines.chain import Chain

    first, _ = chain
    client = _client(first)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    obj = Chain(tiny_chain_config(), first.workdir)
    again = obj.select_only(obj.cfg.teachers, baseline=False)
    keys = ("version", "rank", "sweep", "sweep_id", "trial_id")
    assert [{k: t[k] for k in keys} for t in again] == [{k: t[k] for k in keys} for t in first.teachers]
    assert len(client.search_model_versions("name='mdlda-teacher'")) == K
