"""The ablation's statistics (intervals over seeds, paired differences), the AdaBN recalibration, the per-seed
configs, and (on a local Ray) a two-seed ablation of the tiny chain."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps
from torch import nn

from mdlda import ablation as stats
from mdlda.adapt import recalibrate_batchnorm


def test_t_interval_matches_scipy_and_is_nan_for_one_value():
    x = [0.31, 0.35, 0.28, 0.40]
    mean, half = stats.t_interval(x)
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=sps.sem(x))
    assert mean == pytest.approx(np.mean(x)) and half == pytest.approx((hi - lo) / 2)
    assert stats.t_interval([0.3])[0] == 0.3 and math.isnan(stats.t_interval([0.3])[1])
    assert stats.t_interval([0.3, float("nan"), 0.5]) == pytest.approx(stats.t_interval([0.3, 0.5]), nan_ok=True)


def _per_seed() -> pd.DataFrame:
    rows = []
    for seed, (b, s) in {1: (0.30, 0.38), 2: (0.34, 0.37), 3: (0.20, 0.31)}.items():
        for split in ("test", "piano_test"):
            rows.append({"seed": seed, "model": "baseline", "split": split, "r_mean": b, "rmse_mean": 2.0})
            rows[-1]["offset_mean"] = 0.5 * seed
            rows.append({"seed": seed, "model": "student", "split": split, "r_mean": s, "rmse_mean": 1.5 + seed})
            rows[-1]["offset_mean"] = 0.25
    return pd.DataFrame(rows)


def test_summary_pairs_runs_by_seed():
    summary = stats.summarize(_per_seed(), "baseline")
    row = summary[(summary.model == "student") & (summary.split == "piano_test") & (summary.metric == "r_mean")].iloc[0]
    diffs = [0.08, 0.03, 0.11]
    assert row["mean"] == pytest.approx(np.mean([0.38, 0.37, 0.31]))
    assert row["diff"] == pytest.approx(np.mean(diffs)) and row.n_pairs == 3
    assert row["diff_ci"] == pytest.approx(sps.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / math.sqrt(3))
    # the paired interval is narrower than the unpaired one here: the seeds' shared luck cancels
    assert row["diff_ci"] < row["ci"] + summary[(summary.model == "baseline") & (summary.metric == "r_mean")].ci.max()
    base = summary[summary.model == "baseline"]
    assert base["diff"].isna().all() and (base.n_pairs == 0).all()
    with pytest.raises(ValueError, match="baseline 'nope'"):
        stats.summarize(_per_seed(), "nope")


def test_headline_markdown_and_figure(tmp_path):
    summary = stats.summarize(_per_seed(), "baseline")
    head = stats.headline(summary)
    assert list(head.model) == ["baseline", "student"]
    assert head.loc[1, "piano Δr vs baseline"].startswith("+0.073 ± ")
    assert head.loc[0, "piano offset"].startswith("1.00 ± ") and head.loc[1, "piano offset"] == "0.25 ± 0.00"
    md = stats.markdown(head)
    assert md.count("\n") == 4 and "| student |" in md
    from mdlda.ablation_figures import figure

    figure(summary, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 5000


def test_recalibrate_batchnorm_gives_the_domain_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))
    model.train()
    for _ in range(5):  # running statistics of another domain
        model(torch.randn(8, 3) * 5 + 10)
    weights = [p.clone() for p in model.parameters()]
    batches = [torch.randn(6, 3) for _ in range(4)]
    seen = recalibrate_batchnorm(model, iter(batches + [torch.randn(1, 3)]))  # the 1-item batch is skipped
    assert seen == 24 and not model.training
    with torch.no_grad():
        h = [model[0](b) for b in batches]
    bn = model[1]
    assert torch.allclose(bn.running_mean, torch.stack([x.mean(0) for x in h]).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, torch.stack([x.var(0, unbiased=True) for x in h]).mean(0), atol=1e-5)
    assert bn.momentum == 0.1 and all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_batchnorm(model, iter([torch.randn(1, 3)]))


def test_seed_config_changes_only_seeds():
    from tiny_chain import tiny_chain_config

    from pipelines.ablation import seed_config

    cfg = tiny_chain_config()
    a, b = seed_config(cfg, 1), seed_config(cfg, 2)
    assert a.teachers.search_seed == 1 and b.teachers.search_seed == 2
    assert a.teachers.search == cfg.teachers.search and a.teachers.num_samples == cfg.teachers.num_samples
    (base,) = a.baselines
    assert base.mode == "supervised" and base.search["seed"] == 1 and "adv_scale" not in base.search
    assert a.pseudolabel.seed == 1 and a.student.train.seed == 1 and not a.student.champion
    assert a.student.train.lr == cfg.student.train.lr and cfg.student.champion


def test_student_variants_are_checked_when_parsed():
    from tiny_chain import tiny_chain_config

    from mdlda.config import ConfigError
    from pipelines.ablation import AblationPlan, parse_variant, variant_config

    cfg = tiny_chain_config()
    v = parse_variant("init=teacher, train.lr=0.01", cfg)
    assert v.name == "student-init-teacher-train-lr-0.01"
    changed = variant_config(cfg, v)
    assert changed.student.init == "teacher" and changed.student.train.lr == 0.01
    assert changed.teachers == cfg.teachers and changed.student.train.seed == cfg.student.train.seed
    for bad, match in [
        ("init", "expected key=value"),
        ("init=sideways", "student variant"),
        ("train.nope.x=1", "not a key"),
        ("init=" + cfg.student.init, "does not change"),
        ("", "no key=value"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_variant(bad, cfg)
    with pytest.raises(ValueError, match="must differ"):
        AblationPlan([1], [v, v])
    with pytest.raises(ValueError, match="distinct"):
        AblationPlan([1, 1])


@pytest.mark.slow
def test_ablation_of_the_tiny_chain(ray_local, demo_root, tmp_path, monkeypatch, seed_store):
    """One seed through the chain's own stages (the statistics over seeds are tested above): every row is
    measured, the written summary is the statistics of the written per-seed table, the seed's chain nests under
    the ablation's MLflow run, and an ablation student never takes the champion alias."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from tiny_chain import tiny_chain_config

    from pipelines.ablation import AblationPlan, parse_variant, run_ablation
    from pipelines.ablation_report import ORDER

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_chain_config()
    one_epoch = {"max_epochs": 1, "patience": 1}
    search = {**cfg.teachers.search, "lr": {"grid": [2.0e-3, 3.0e-3]}}
    teachers = cfg.teachers.model_copy(
        update={"search": search, "train": cfg.teachers.train.model_copy(update=one_epoch)}
    )
    student = cfg.student.model_copy(update={"train": cfg.student.train.model_copy(update=one_epoch)})
    cfg = cfg.model_copy(update={"teachers": teachers, "student": student})
    variant = parse_variant("weighting=spread", cfg)
    seed_store(tmp_path / "w")
    res = run_ablation(cfg, demo_root, tmp_path / "w", AblationPlan([7], [variant]))

    per_seed = pd.read_csv(res.out_dir / "per_seed.csv")
    rows = [*ORDER, "student-weighting-spread", "student-weighting-spread+AdaBN"]
    assert set(per_seed.model) == set(rows) and len(per_seed) == len(rows) * 2
    # the variant is its own student (own stage run and version), paired to the seed's student in the report
    assert "## Student variants" in (res.out_dir / "ablation.md").read_text()
    sr = per_seed.set_index(["model", "split"]).r_mean
    assert (sr.loc["student-weighting-spread"] != sr.loc["student"]).any()
    assert per_seed.r_mean.notna().all() and per_seed.rmse_mean.gt(0).all()
    assert per_seed.in_scale.between(0, 1).all()
    # a level offset is part of the RMSE (RMSE^2 = offset^2 + the error about the means), per feature
    from mdlda.params import FEATURES

    for f in FEATURES:
        assert (per_seed[f"offset_{f}"].abs() <= per_seed[f"rmse_{f}"] + 1e-9).all()
    assert per_seed.offset_ref.ge(0).all() and per_seed.offset_mean.ge(0).all()
    piano = per_seed[per_seed.split == "piano_test"].set_index("model")
    assert piano.disc_out.notna().all() and piano.loc[["baseline", "student"]].disc_emb.notna().all()
    # AdaBN keeps the weights and changes the BatchNorm statistics, so the predictions
    r = per_seed.set_index(["model", "split"]).r_mean
    assert (r.loc["baseline"] != r.loc["baseline+AdaBN"]).any()
    # the ensemble predicts the teachers' mean, so (triangle inequality) its RMSE is at most their mean RMSE
    rmse = per_seed.set_index(["model", "split"]).rmse_mean
    assert (rmse.loc["teacher-ensemble"] <= rmse.loc["teacher"] + 1e-9).all()

    # the label-free probe: every single model ranked on MAESTRO, the teachers one by one in models.csv
    models = pd.read_csv(res.out_dir / "models.csv")
    members = {f"teacher-{i + 1}" for i in range(cfg.teachers.top_k)}
    assert members | {"baseline", "student"} <= set(models.model) and "teacher-ensemble" not in set(models.model)
    probe = models[models.split == "piano_test"]
    assert probe.rank_emb.between(1, probe.rank_pool).all() and probe.rank_out.between(1, probe.rank_pool).all()
    assert (piano.rank_out.notna()).all() and "Label-free probe" in (res.out_dir / "ablation.md").read_text()

    summary = pd.read_csv(res.out_dir / "ablation.csv")
    row = summary[(summary.model == "student") & (summary.split == "piano_test") & (summary.metric == "r_mean")]
    assert row["mean"].item() == pytest.approx(piano.at["student", "r_mean"])
    assert row["diff"].item() == pytest.approx(piano.at["student", "r_mean"] - piano.at["baseline", "r_mean"])
    assert math.isnan(row["ci"].item())  # one seed: no interval
    text = (res.out_dir / "ablation.md").read_text()
    assert "over 1 seeds" in text and "| student |" in text and (res.out_dir / "ablation.png").stat().st_size > 5000
    assert "piano offset" in text and ", offset " in text  # the level offsets, and the training mean's
    assert (res.out_dir.parent / "latest").resolve() == res.out_dir.resolve()

    client = MlflowClient()
    children = client.search_runs(
        [client.get_run(res.run_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{res.run_id}'"
    )
    assert [r.data.tags["ablation.seed"] for r in children] == ["7"]
    assert {a.path for a in client.list_artifacts(res.run_id, "ablation")} >= {"ablation/ablation.md"}
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("mdlda-student", "champion")
    assert len(res.teachers) == cfg.teachers.top_k and res.teachers.adv_scale.eq(0.3).all()
