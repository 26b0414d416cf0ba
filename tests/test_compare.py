"""`mdlda compare` on generated performances of one piece with known differences (mdlda.datasets.performances).

The alignment is checked on the real written audio (44.1 kHz stereo WAVs, decoded and resampled as the command
does) against the tempo maps the performances were rendered with. The feature-sign test uses a controlled
function of the audio as the model (the share of quiet frames in a window as "articulation", via
:func:`mdlda.datasets.conespressione.audio_descriptors`): a tiny trained model cannot be relied on to hear
staccato, and the test is about the comparison, not the model. The command runs end to end with a tiny real model
registered in a real SQLite MLflow store (weights-only checkpoint, no export).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import one_thread  # noqa: F401  (autouse fixture: one torch thread for tiny tensors)

from mdlda import align as align_mod
from mdlda.align import ChromaStream, align
from mdlda.audio import stream_blocks
from mdlda.compare import block_bootstrap, compare, find_passages
from mdlda.datasets.conespressione import audio_descriptors
from mdlda.datasets.performances import generate_performances, warp
from mdlda.params import FEATURES, SAMPLE_RATE

SECONDS = 45.0
HOP = 5.0
# The alignment's tolerance at the reference's note onsets (the frame hop is 0.1 s).
TOL_MEDIAN_S, TOL_P95_S, TOL_MAX_S = 0.1, 0.25, 0.5


@pytest.fixture(scope="module")
def perf(tmp_path_factory) -> dict:
    return generate_performances(tmp_path_factory.mktemp("perf"), seed=0, seconds=SECONDS)


@pytest.fixture(scope="module")
def chroma(perf) -> dict:
    out = {}
    for name, path in perf["files"].items():
        stream = ChromaStream()
        for block in stream_blocks(path):
            stream.feed(block)
        out[name] = (stream.frames(), stream.samples / SAMPLE_RATE)
    return out


def detachment_model(audio: torch.Tensor) -> torch.Tensor:
    """A controlled 'model': articulation = 1 + 9 x the share of quiet frames in the window; the rest 5.5."""
    out = np.full((audio.shape[0], len(FEATURES)), 5.5, dtype=np.float32)
    for i, x in enumerate(audio.numpy()):
        out[i, FEATURES.index("articulation")] = 1 + 9 * audio_descriptors(x, SAMPLE_RATE)["detachment"]
    return torch.from_numpy(out)


def _onset_errors(alignment, knots, onsets) -> np.ndarray:
    t = onsets[(onsets > 1.0) & (onsets < SECONDS - 2.0)]  # the ends are pinned anyway
    return np.abs(alignment.to_performance(t) - warp(knots, t))


def test_streamed_chroma_is_the_chroma_of_the_whole_recording():
    x = np.random.default_rng(0).standard_normal(int(7.3 * SAMPLE_RATE)).astype(np.float32)
    whole, pieces = ChromaStream(), ChromaStream()
    whole.feed(x)
    for a in range(0, len(x), 9_999):  # blocks that do not line up with frames
        pieces.feed(x[a : a + 9_999])
    assert whole.frames().shape == (12, (len(x) - align_mod.N_FFT) // align_mod.HOP + 1)
    assert np.allclose(pieces.frames(), whole.frames(), atol=1e-5)


@pytest.mark.parametrize("name", ["B_faster_detached", "C_slower"])
def test_alignment_recovers_the_known_time_map(perf, chroma, name):
    (ref, ref_dur), (other, other_dur) = chroma["A_reference"], chroma[name]
    a = align(ref, other, (ref_dur, other_dur))
    err = _onset_errors(a, perf["maps"][name], perf["onsets"])
    assert np.median(err) <= TOL_MEDIAN_S and np.percentile(err, 95) <= TOL_P95_S and err.max() <= TOL_MAX_S, (
        np.median(err),
        np.percentile(err, 95),
        err.max(),
    )
    # the inverse map takes the performance's onsets back to the reference's
    t = perf["onsets"][(perf["onsets"] > 1.0) & (perf["onsets"] < SECONDS - 2.0)]
    assert np.median(np.abs(a.to_reference(warp(perf["maps"][name], t)) - t)) <= TOL_MEDIAN_S * 1.5
    # the tolerance means something: no alignment (the identity) is far outside it
    assert np.percentile(np.abs(t - warp(perf["maps"][name], t)), 95) > 10 * TOL_P95_S


def test_long_recordings_are_aligned_on_averaged_frames_within_their_resolution(perf, chroma, monkeypatch):
    monkeypatch.setattr(align_mod, "MAX_FRAMES", 120)  # as if 45 s were 3 x 5 minutes long: groups of 4 frames
    (ref, ref_dur), (other, other_dur) = chroma["A_reference"], chroma["B_faster_detached"]
    a = align(ref, other, (ref_dur, other_dur))
    assert a.resolution_s == pytest.approx(4 * align_mod.HOP / SAMPLE_RATE)
    err = _onset_errors(a, perf["maps"]["B_faster_detached"], perf["onsets"])
    assert np.median(err) <= a.resolution_s and err.max() <= 3 * a.resolution_s, (np.median(err), err.max())


def test_block_bootstrap_is_seeded_and_covers_the_mean():
    d = np.random.default_rng(1).normal(0.7, 1.0, 200)
    m, lo, hi = block_bootstrap(d, block=1, n_boot=4000, seed=3)
    assert (m, lo, hi) == block_bootstrap(d, block=1, n_boot=4000, seed=3)  # seeded: identical
    assert lo < m < hi and m == pytest.approx(d.mean())
    assert hi - lo == pytest.approx(2 * 1.96 * d.std() / np.sqrt(len(d)), rel=0.15)  # iid: the normal interval
    # correlated windows (each value repeated 5 times): blocks of 5 give the honest, wider interval
    r = np.repeat(d[:40], 5)
    _, lo1, hi1 = block_bootstrap(r, block=1, seed=0)
    _, lo5, hi5 = block_bootstrap(r, block=5, seed=0)
    assert (hi5 - lo5) > 1.7 * (hi1 - lo1)
    assert block_bootstrap(np.full(10, 2.0), block=3)[1:] == (2.0, 2.0)
    assert np.isnan(block_bootstrap(d[:5], block=3)[1:]).all()  # fewer than two blocks: no interval


def test_passages_are_runs_of_one_sign_ranked_by_area():
    t = np.arange(12) * HOP + 7.5
    ref = pd.DataFrame({"reference_s": t, "performance": "A", "performance_s": t} | {f: 5.0 for f in FEATURES})
    other = ref.assign(performance="B")
    other.loc[3:5, "articulation"] = 7.0  # +2 for three windows: area 30
    other.loc[8:9, "minorness"] = 4.0  # -1 for two windows: area 10
    other.loc[11, "dissonance"] = 5.3  # below the threshold
    found = find_passages(pd.concat([ref, other], ignore_index=True), "A", HOP, min_diff=0.5)
    assert list(found.feature) == ["articulation", "minorness"]
    first, second = found.iloc[0], found.iloc[1]
    assert (first.start_s, first.end_s, first.mean_diff, first.area) == (20.0, 35.0, 2.0, 30.0)
    assert (second.start_s, second.end_s, second.mean_diff, second.windows) == (45.0, 55.0, -1.0, 2)


def test_a_detached_passage_shows_as_more_staccato_in_the_right_place(perf, tmp_path):
    files = perf["files"]
    paths = [files["A_reference"], files["B_faster_detached"], files["C_slower"]]
    bars = np.loadtxt(perf["bars"])
    result = compare(detachment_model, paths, tmp_path / "out", hop_s=HOP, bars=bars, model_uri="detachment")
    diff = result.differences.set_index(["performance", "feature"])
    b, c = diff.loc[("B_faster_detached", "articulation")], diff.loc[("C_slower", "articulation")]
    assert b.mean_diff > 0.3 and b.ci_low > 0, b  # B is more detached, and the interval says so
    assert abs(c.mean_diff) < 0.25 * b.mean_diff, c  # C only plays slower: about no change in articulation
    top = result.passages.iloc[0]
    lo, hi = perf["detached"]
    assert (top.performance, top.feature) == ("B_faster_detached", "articulation") and top.mean_diff > 0
    assert top.start_s < hi and top.end_s > lo and lo - HOP <= (top.start_s + top.end_s) / 2 <= hi + HOP, top
    summary = result.files["summary"].read_text()
    assert re.search(
        r"B_faster_detached is more staccato than A_reference in \d:\d\d-\d:\d\d \(bars \d+-\d+\)", summary
    )
    # the outputs: figure in both formats, the aligned curves on the reference's grid, the time maps
    assert result.files["png"].read_bytes()[:4] == b"\x89PNG" and b"<svg" in result.files["svg"].read_bytes()[:400]
    curves = pd.read_csv(result.files["curves"])
    assert list(curves.columns) == ["reference_s", "performance", "performance_s", *FEATURES]
    grid = curves[curves.performance == "A_reference"].reference_s.to_numpy()
    assert np.allclose(curves[curves.performance == "C_slower"].reference_s, grid)
    on_c = curves[curves.performance == "C_slower"].performance_s.to_numpy()
    assert np.allclose(on_c, grid / 0.85, atol=TOL_MAX_S)  # C's times are the reference's, 0.85x slower
    maps = pd.read_csv(result.files["alignment"])
    assert set(maps.performance) == {"B_faster_detached", "C_slower"}
    assert all(
        g.reference_s.is_monotonic_increasing and g.performance_s.is_monotonic_increasing
        for _, g in maps.groupby("performance")
    )

    # swapped roles: with B as the reference, A is the more legato one
    swapped = compare(detachment_model, paths[1::-1], None, hop_s=HOP)
    d = swapped.differences.set_index(["performance", "feature"]).loc[("A_reference", "articulation")]
    assert d.mean_diff < -0.3 and d.ci_high < 0


# ------------------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def store(tmp_path_factory, seed_store):
    """A real SQLite MLflow store holding a tiny RF-ResNet as mdlda-student@champion (weights-only checkpoint)."""
    import os

    import mlflow
    from mlflow.tracking import MlflowClient

    from mdlda.checkpoints import save_model
    from mdlda.models import create_model
    from mdlda.tracking import CHAMPION, STUDENT_MODEL, setup_tracking

    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    work = tmp_path_factory.mktemp("work")
    seed_store(work)
    setup_tracking(work, "models")
    torch.manual_seed(0)
    model = create_model("rfresnet", width=2).eval()
    ckpt = save_model(model, work / "ckpt")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(ckpt), artifact_path="model-checkpoint")
    client = MlflowClient()
    client.create_registered_model(STUDENT_MODEL)
    v = client.create_model_version(STUDENT_MODEL, f"{run.info.artifact_uri}/model-checkpoint", run.info.run_id)
    client.set_registered_model_alias(STUDENT_MODEL, CHAMPION, v.version)
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the command finds the store through --workdir
    mlflow.set_tracking_uri(None)
    yield work, model
    mlflow.set_tracking_uri(None)
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def _invoke(args):
    from typer.testing import CliRunner

    from pipelines.cli import app

    return CliRunner().invoke(app, args)


def test_the_command_writes_every_output_from_the_registered_champion(perf, store, tmp_path):
    from mdlda.predict import predict_recording
    from mdlda.tracking import RatingModel

    work, model = store
    a, b = perf["files"]["A_reference"], perf["files"]["B_faster_detached"]
    out = tmp_path / "cmp"
    res = _invoke(["compare", a, b, "--workdir", str(work), "--out", str(out), "--hop", "10"])
    assert res.exit_code == 0, res.output
    assert "compared with A_reference" in res.output and f"summary: {out / 'summary.md'}" in res.output
    assert {p.name for p in out.iterdir()} == {
        "compare.png", "compare.svg", "summary.md", "curves.csv", "alignment.csv", "differences.csv", "passages.csv"
    }  # fmt: skip
    curves = pd.read_csv(out / "curves.csv")
    expect = predict_recording(RatingModel(model).eval(), a, hop_s=10.0)  # the reference's curve is predict's
    ref = curves[curves.performance == "A_reference"]
    assert np.allclose(ref[list(FEATURES)].to_numpy(), expect[list(FEATURES)].to_numpy(), atol=1e-3)
    diff = pd.read_csv(out / "differences.csv")
    assert (
        len(diff) == len(FEATURES) and (diff.ci_low <= diff.mean_diff).all() and (diff.mean_diff <= diff.ci_high).all()
    )


def test_the_command_refuses_a_model_the_store_does_not_hold(perf, store, tmp_path):
    work, _ = store
    a, b = perf["files"]["A_reference"], perf["files"]["C_slower"]
    res = _invoke(["compare", a, b, "--workdir", str(work), "--out", str(tmp_path / "o"), "--model", "models:/nope@x"])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "models:/nope@x" in lines[0] and not (tmp_path / "o").exists()
