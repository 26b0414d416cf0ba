"""The generated demo dataset: real formats read back by the real indexes, determinism, audible labels."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from mdlda.audio import fit_clip, load
from mdlda.datasets import generate_demo, index_maestro, index_midlevel
from mdlda.datasets.demo import SIZES, _clip_plan
from mdlda.datasets.demo_synth import CHORD, MAJOR, MELODY, SR, ToneBank, compose, render
from mdlda.params import FEATURES

MID = FEATURES.index


@pytest.fixture(scope="module")
def demo(demo_root: Path) -> dict[str, Path]:
    """The session's tiny demo (tests/conftest.py: ``generate_demo(root, seed=0, size="tiny")``)."""
    return {
        "out": demo_root,
        "midlevel_root": demo_root / "midlevel",
        "piano_ids": demo_root / "midlevel" / "piano_ids.csv",
        "maestro_root": demo_root / "maestro",
    }


@pytest.fixture(scope="module")
def midlevel(demo):
    return index_midlevel(demo["midlevel_root"], demo["piano_ids"])


def test_midlevel_demo_reads_back_without_skips(demo, midlevel) -> None:
    assert midlevel.skipped == []
    assert midlevel.split_sizes == {"train": 36, "valid": 1, "test": 3, "piano_test": 8}
    assert sum(midlevel.split_sizes.values()) == len(midlevel.table) == 48
    t = midlevel.table
    assert (t.loc[t["split"] == "piano_test", "domain"] == "target").all()
    labels = np.array(t["labels"].tolist())
    assert labels.shape == (48, 7) and labels.min() >= 1.0 and labels.max() <= 10.0


def test_demo_artists_never_cross_splits(midlevel) -> None:
    t = midlevel.table
    assert (t.groupby("group")["split"].nunique() == 1).all()
    counts = t[t["domain"] == "source"]["group"].value_counts()
    assert (counts == 1).sum() >= 4 and (counts > 1).sum() >= 3  # single-track artists and bands


def test_midlevel_demo_files_look_like_the_real_ones(demo, midlevel) -> None:
    root = Path(demo["midlevel_root"])
    header = (root / "metadata_annotations" / "annotations.csv").read_text().splitlines()[0]
    assert header.startswith("song_id, melody, articulation")  # stray spaces, as in the real file
    meta = pd.read_csv(root / "metadata_annotations" / "metadata.csv", sep=";")
    assert list(meta.columns) == ["song id", "file name", "Source", "Artist"]
    fits = []
    for path in midlevel.table["path"]:
        info = sf.info(path)
        assert info.format == "MP3" and info.samplerate == 44_100
        assert 14.4 < info.duration < 16.0
        fits.append(fit_clip(load(path))[1])
    assert "padded" in fits and "cropped" in fits


def test_maestro_demo_reads_back_as_stereo_wav(demo) -> None:
    ix = index_maestro(demo["maestro_root"])
    assert ix.skipped == [] and len(ix.table) == 3
    assert ix.split_sizes == {"train": 1, "validation": 1, "test": 1}
    rates = set()
    for rec in ix.table.itertuples():
        info = sf.info(rec.path)
        assert info.channels == 2 and info.samplerate in (44_100, 48_000) and info.subtype == "PCM_16"
        assert rec.duration == pytest.approx(info.duration, abs=1e-3)
        assert 38 <= rec.duration <= 45 and rec.expected_segments == int(rec.duration // 15)
        rates.add(info.samplerate)
    assert rates == {44_100, 48_000}
    root = Path(demo["maestro_root"])
    columns = json.loads((root / "maestro-v3.0.0.json").read_text())
    assert pd.DataFrame(columns).reset_index(drop=True).equals(pd.read_csv(root / "maestro-v3.0.0.csv"))


@pytest.mark.slow  # generates the whole tiny demo a second time
def test_same_seed_gives_identical_csvs_and_audio(demo, tmp_path) -> None:
    again = generate_demo(tmp_path / "again", seed=0, size="tiny", workers=3)  # other thread count
    assert again["source_clips"] == 40 and again["piano_clips"] == 8 and again["maestro_performances"] == 3
    first, second = Path(demo["out"]), Path(again["out"])
    csvs = sorted(p.relative_to(first) for p in first.rglob("*.csv")) + [Path("maestro/maestro-v3.0.0.json")]
    assert len(csvs) == 5
    for rel in csvs:
        assert filecmp.cmp(first / rel, second / rel, shallow=False), rel
    audio = sorted(p.relative_to(first) for p in first.rglob("*") if p.suffix in (".mp3", ".wav"))
    assert len(audio) == 51
    for rel in audio:
        np.testing.assert_array_equal(sf.read(first / rel)[0], sf.read(second / rel)[0], err_msg=str(rel))
    assert not _clip_plan(0, SIZES["tiny"]).equals(_clip_plan(1, SIZES["tiny"]))


def test_unknown_size_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="tiny"):
        generate_demo(tmp_path, size="huge")


def test_articulation_is_audible_as_gaps(midlevel) -> None:
    """Staccato (high articulation) leaves quiet gaps between notes: the share of quiet frames follows it."""
    quiet, rating = [], []
    for rec in midlevel.table.itertuples():
        x = load(rec.path)[: 15 * SR]
        frames = x[: len(x) // 512 * 512].reshape(-1, 512)
        level = 10 * np.log10((frames**2).mean(axis=1) + 1e-10)
        quiet.append(float((level < level.max() - 30).mean()))
        rating.append(rec.labels[MID("articulation")])
    assert rank_correlation(quiet, rating) > 0.6


def rank_correlation(a, b) -> float:
    """Spearman's rho (no ties expected)."""
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def pitch_class_energy(x: np.ndarray, n_fft: int = 8192) -> np.ndarray:
    """(12,) spectral power per pitch class (C = 0), from 60 Hz to 5 kHz."""
    frames = x[: len(x) // n_fft * n_fft].reshape(-1, n_fft) * np.hanning(n_fft)
    power = (np.abs(np.fft.rfft(frames, axis=1)) ** 2).sum(axis=0)
    freq = np.fft.rfftfreq(n_fft, 1 / SR)
    band = (freq > 60) & (freq < 5000)
    pc = np.round(12 * np.log2(freq[band] / 440.0) + 69).astype(int) % 12
    return np.bincount(pc, weights=power[band], minlength=12) / power[band].sum()


# Controlled renders: the same clip with one knob at its extremes (the others fixed).


def score(knobs: dict[str, float], seed: int, timbre: str = "strings") -> dict:
    k = np.random.default_rng(100 + seed).random(7)
    for name, value in knobs.items():
        k[MID(name)] = value
    return compose(k, 15.0, np.random.default_rng(seed), timbre, drums=False)


@pytest.mark.parametrize("timbre", ["strings", "piano"])
def test_minorness_is_audible_as_the_minor_third(timbre: str) -> None:
    """In one key, minor clips hold more energy at tonic + 3 semitones than at + 4; major, the reverse."""
    bank = ToneBank()
    for seed in range(2):
        third = []
        for minorness in (0.0, 1.0):
            s = score({"minorness": minorness, "tonal_stability": 1.0}, seed, timbre)
            x = render(s, timbre, 15 * SR, bank, np.random.default_rng(seed))
            chroma = pitch_class_energy(x)
            third.append(chroma[(s["tonic"] + 3) % 12] - chroma[(s["tonic"] + 4) % 12])
        assert third[0] < 0 < third[1]


def interval_share(s: dict, classes: tuple[int, ...]) -> float:
    """Share of pairs of simultaneously sounding notes whose interval class is in ``classes``."""
    onset, dur, pitch = s["notes"][:, 0], s["notes"][:, 1], s["notes"][:, 2].astype(int)
    overlap = (onset[:, None] < onset[None, :] + dur[None, :]) & (onset[None, :] < onset[:, None] + dur[:, None])
    ic = np.abs(pitch[:, None] - pitch[None, :]) % 12
    pairs = np.triu(overlap, 1) & (pitch[:, None] != pitch[None, :])
    return float(np.isin(ic[pairs], classes).mean())


def test_dissonance_adds_seconds_and_tritones() -> None:
    for seed in range(3):
        low, high = (interval_share(score({"dissonance": d}, seed), (1, 11, 6)) for d in (0.0, 1.0))
        assert high > low + 0.1


def test_melodiousness_is_stepwise_motion() -> None:
    for seed in range(3):
        leaps = []
        for m in (0.0, 1.0):
            notes = score({"melodiousness": m, "tonal_stability": 1.0}, seed)["notes"]
            leaps.append(np.abs(np.diff(notes[notes[:, 4] == MELODY, 2])).mean())
        assert leaps[1] < 3.5 and leaps[0] > 2 * leaps[1]  # semitones


def test_tonal_stability_keeps_notes_in_key() -> None:
    for seed in range(3):
        outside = []
        for t in (0.0, 1.0):
            s = score({"tonal_stability": t, "minorness": 0.0, "dissonance": 0.0}, seed)
            pc = (s["notes"][:, 2].astype(int) - s["tonic"]) % 12
            outside.append(float((~np.isin(pc, MAJOR)).mean()))
        assert outside[1] == 0.0 < outside[0]


def test_rhythm_stability_and_complexity_shape_the_onsets() -> None:
    for seed in range(3):
        grid_error, values = [], []
        for r in (0.0, 1.0):
            s = score({"rhythm_stability": r, "rhythm_complexity": 0.0}, seed)
            chords = np.unique(s["notes"][s["notes"][:, 4] == CHORD, 0])  # simple: every 2 beats
            steps = np.diff(chords)
            grid_error.append(np.std(steps) / np.mean(steps))
        for c in (0.0, 1.0):
            melody = score({"rhythm_complexity": c, "rhythm_stability": 1.0, "melodiousness": 1.0}, seed)["notes"]
            values.append(len(np.unique(np.round(np.diff(melody[melody[:, 4] == MELODY, 0]), 3))))
        assert grid_error[1] < 1e-6 < 0.05 < grid_error[0]
        assert values[0] == 1 < 3 < values[1]
