"""The label-free neighbour-rank probe (rank@100) and how its agreement with piano r is measured."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mdlda.ablation import probe_agreement
from mdlda.probe import neighbour_rank, successor_pairs


def _performances(n_perf: int = 12, n_seg: int = 5, dim: int = 16, noise: float = 0.1, seed: int = 0):
    """Segments whose vectors are their performance's centre plus noise: successors are near, others far."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_perf, dim))
    groups = np.repeat([f"p{i}" for i in range(n_perf)], n_seg)
    offsets = np.tile(np.arange(n_seg) * 15.0, n_perf)
    vectors = centres.repeat(n_seg, axis=0) + noise * rng.normal(size=(n_perf * n_seg, dim))
    return vectors, groups, offsets


def test_successors_follow_the_offsets_not_the_row_order():
    groups = np.array(["a", "b", "a", "a", "b"])
    offsets = np.array([30.0, 0.0, 0.0, 15.0, 15.0])
    assert successor_pairs(groups, offsets) == [(2, 3), (3, 0), (1, 4)]


def test_a_representation_that_keeps_performances_apart_ranks_the_successor_first():
    vectors, groups, offsets = _performances()
    r = neighbour_rank(vectors, groups, offsets, n_distractors=30)
    assert r["rank_mean"] == pytest.approx(1.0) and r["rank_geo"] == pytest.approx(1.0)
    assert r["pool"] == 31 and r["n_anchors"] == 12 * 4


def test_a_representation_without_information_sits_at_chance():
    vectors, groups, offsets = _performances()
    const = neighbour_rank(np.ones_like(vectors), groups, offsets, n_distractors=30)
    assert const["rank_mean"] == pytest.approx(const["chance"]) == pytest.approx(16.0)
    rng = np.random.default_rng(1)
    noise = neighbour_rank(rng.normal(size=(600, 16)), np.repeat(np.arange(120), 5), np.tile(np.arange(5), 120))
    assert noise["pool"] == 100 and abs(noise["rank_mean"] - noise["chance"]) < 5  # 480 anchors: s.e. ~1.3
    noisier = neighbour_rank(*_performances(noise=3.0), n_distractors=30)["rank_mean"]
    assert 1.0 < noisier < const["rank_mean"]  # partly informative: between the two


def test_a_small_dataset_uses_every_other_performance_and_says_so():
    vectors, groups, offsets = _performances(n_perf=3, n_seg=4)
    r = neighbour_rank(vectors, groups, offsets)
    assert r["pool"] == 9  # 8 segments of the two other performances + the successor


def test_bad_inputs_are_refused_and_no_pairs_give_nan():
    with pytest.raises(ValueError, match="must be"):
        neighbour_rank(np.zeros((3, 2)), ["a", "a"], [0, 1])
    with pytest.raises(ValueError, match="n_distractors"):
        neighbour_rank(np.zeros((2, 2)), ["a", "a"], [0, 1], n_distractors=0)
    alone = neighbour_rank(np.eye(3), ["a", "a", "a"], [0, 1, 2])  # no other performance
    assert np.isnan(alone["rank_mean"]) and alone["n_anchors"] == 0


def _models(rank_of_r) -> pd.DataFrame:
    rows = []
    for seed in (1, 2):
        for i, r in enumerate([0.1, 0.2, 0.3, 0.4, 0.5]):
            rows.append(
                {
                    "seed": seed,
                    "model": f"m{i}",
                    "split": "piano_test",
                    "r_mean": r + seed / 10,
                    "rank_emb": rank_of_r(r, seed),
                    "disc_emb": 1.0,
                }
            )
            rows.append({"seed": seed, "model": f"m{i}", "split": "test", "r_mean": 0.3})
    return pd.DataFrame(rows)


def test_agreement_is_positive_when_a_lower_rank_goes_with_a_higher_piano_r():
    agree = probe_agreement(_models(lambda r, s: 50 - 100 * r)).set_index("signal")
    assert agree.at["rank_emb", "rho"] > 0.8 and agree.at["rank_emb", "rho_within_seed"] == pytest.approx(1.0)
    assert agree.at["rank_emb", "n_models"] == 10 and agree.at["rank_emb", "n_seeds"] == 2
    against = probe_agreement(_models(lambda r, s: 100 * r)).set_index("signal")
    assert against.at["rank_emb", "rho_within_seed"] == pytest.approx(-1.0)
    # a constant signal orders nothing: no rho rather than a number
    assert np.isnan(agree.at["disc_emb", "rho"]) and np.isnan(agree.at["disc_emb", "rho_within_seed"])


def test_the_probe_figure_plots_every_measured_signal_and_skips_an_unmeasured_one(tmp_path):
    from mdlda.ablation_figures import probe_figure

    models = _models(lambda r, s: 50 - 100 * r)
    assert probe_figure(models, probe_agreement(models), tmp_path / "probe.png")
    assert (tmp_path / "probe.png").stat().st_size > 5000
    no_probe = models.drop(columns=["rank_emb", "disc_emb"])
    no_probe = no_probe[no_probe.split == "test"]  # no piano rows: nothing to plot against
    assert not probe_figure(no_probe, probe_agreement(no_probe), tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
