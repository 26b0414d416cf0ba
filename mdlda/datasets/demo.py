"""Generate a demo dataset in exactly the real on-disk formats (Mid-level + MAESTRO), with learnable labels.

``generate_demo(out)`` writes::

    out/midlevel/metadata_annotations/annotations.csv   song_id, melody, ... (stray spaces, as the real one)
    out/midlevel/metadata_annotations/metadata.csv      song id;file name;Source;Artist
    out/midlevel/audio/<song_id>.mp3                     ~15 s, 44.1 kHz (a few ~0.5 s short: padding)
    out/midlevel/piano_ids.csv                           song id  (the piano clips: target-domain test set)
    out/maestro/maestro-v3.0.0.csv / .json               the release's columns (JSON column-oriented)
    out/maestro/<year>/<name>.wav                        stereo piano, 44.1 or 48 kHz, 40-120 s

Each clip draws its seven feature knobs independently and uniformly in [0, 1]; the audio is composed from
them (see :mod:`mdlda.datasets.demo_synth`) and its ratings are ``1 + 9 * knob`` plus a little noise,
clipped to 1..10. Source clips use non-piano timbres (several artists with one track, several with many);
piano clips and MAESTRO performances use the piano model. The same seed gives identical CSVs and identical
audio. The MIDI files the MAESTRO CSV names are not written (no loader reads them).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mdlda.datasets import maestro as maestro_fmt
from mdlda.datasets import midlevel as midlevel_fmt
from mdlda.datasets.demo_synth import PIANO, SOURCE_TIMBRES, SR, ToneBank, compose, render
from mdlda.params import NUM_FEATURES, RATING_MAX, RATING_MIN

MIDLEVEL_RATE = 44_100
MAESTRO_YEARS = {2004: 44_100, 2006: 44_100, 2008: 48_000, 2009: 48_000, 2011: 44_100, 2013: 48_000}
LABEL_NOISE = 0.3  # sd of the rating noise, on the 1..10 scale
SOURCES = ("jamendo", "magnatune", "soundcloud", "freemusicarchive")
_WORDS = ("Amber", "Copper", "Velvet", "Hollow", "Silver", "Northern", "Paper", "Quiet", "Electric", "Glass")
_NOUNS = ("Lanterns", "Harbour", "Orchard", "Tides", "Engines", "Sparrows", "Circuit", "Meadow", "Atlas")


@dataclass(frozen=True)
class DemoSize:
    single_artists: int  # source artists with one track each
    bands: int  # source artists with many tracks
    tracks_per_band: int
    piano_artists: int
    piano_clips: int
    maestro: int
    maestro_seconds: tuple[float, float]
    maestro_splits: tuple[str, ...]


SIZES = {
    "tiny": DemoSize(10, 6, 5, 3, 8, 3, (38.0, 45.0), ("train", "validation", "test")),
    "small": DemoSize(40, 16, 10, 6, 24, 8, (60.0, 120.0), ("train",) * 5 + ("validation",) * 2 + ("test",)),
}


def knobs_to_ratings(knobs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ratings (1..10) from knobs in [0, 1]: ``1 + 9 * knob`` + N(0, LABEL_NOISE), clipped, 3 decimals."""
    r = RATING_MIN + (RATING_MAX - RATING_MIN) * knobs + rng.normal(0.0, LABEL_NOISE, knobs.shape)
    return np.round(np.clip(r, RATING_MIN, RATING_MAX), 3)


def _artist_names(n: int, rng: np.random.Generator) -> list[str]:
    pairs = [f"The {w} {v}" for w in _WORDS for v in _NOUNS]
    names = [pairs[i] for i in rng.permutation(len(pairs))[:n]]
    return names + [f"Artist {i:03d}" for i in range(len(names), n)]


def _upsample(x: np.ndarray, rate: int) -> np.ndarray:
    import soxr

    return soxr.resample(x, SR, rate, quality="HQ").astype(np.float32)


def _clip_plan(seed: int, size: DemoSize) -> pd.DataFrame:
    """One row per Mid-level clip: song id, artist, source, timbre, drums, seconds."""
    rng = np.random.default_rng([seed, 0])
    n_src_artists = size.single_artists + size.bands
    names = _artist_names(n_src_artists + size.piano_artists, rng)
    rows = []
    for a in range(size.single_artists):
        rows.append((names[a], SOURCE_TIMBRES[int(rng.integers(len(SOURCE_TIMBRES)))], bool(rng.random() < 0.5)))
    for a in range(size.single_artists, n_src_artists):
        home, drums = SOURCE_TIMBRES[a % len(SOURCE_TIMBRES)], bool(rng.random() < 0.6)
        for _ in range(size.tracks_per_band):
            other = SOURCE_TIMBRES[int(rng.integers(len(SOURCE_TIMBRES)))]
            rows.append((names[a], home if rng.random() < 0.7 else other, drums))
    for k in range(size.piano_clips):
        rows.append((names[n_src_artists + k % size.piano_artists], PIANO, False))
    plan = pd.DataFrame(rows, columns=["artist", "timbre", "drums"])
    source_of = {a: SOURCES[int(rng.integers(len(SOURCES)))] for a in plan["artist"].unique()}
    plan["source"] = plan["artist"].map(source_of)
    plan["song_id"] = rng.permutation(len(plan)) + 1
    short = rng.random(len(plan)) < 0.1
    short[int(rng.integers(len(plan)))] = True  # at least one clip needs padding
    plan["seconds"] = np.where(short, 14.5, 15.0 + rng.uniform(0.0, 0.8, len(plan))).round(3)
    return plan


def _midlevel_clip(path: Path, row, knobs: np.ndarray, rng: np.random.Generator, bank: ToneBank) -> float:
    import soundfile as sf

    score = compose(knobs, row.seconds, rng, row.timbre, row.drums)
    x = render(score, row.timbre, int(round(row.seconds * SR)), bank, rng)
    audio = _upsample(x, MIDLEVEL_RATE)
    sf.write(str(path), audio, MIDLEVEL_RATE, format="MP3", bitrate_mode="VARIABLE", compression_level=0.9)
    return len(audio) / MIDLEVEL_RATE


def _maestro_performance(path: Path, seconds: float, rate: int, rng: np.random.Generator, bank: ToneBank) -> float:
    """A stereo piano performance in sections of ~15-25 s, each with its own (unrecorded) knobs."""
    import soundfile as sf

    n = int(round(seconds * SR))
    out, start = np.zeros((n, 2), dtype=np.float32), 0
    while start < n:
        length = min(int(rng.uniform(15.0, 25.0) * SR), n - start)
        score = compose(rng.random(NUM_FEATURES), length / SR, rng, PIANO, drums=False)
        out[start : start + length] = render(score, PIANO, length, bank, rng, pan=True)
        start += length
    audio = _upsample(out, rate)
    sf.write(str(path), audio, rate, subtype="PCM_16")
    return len(audio) / rate


def generate_demo(out: str | Path, seed: int = 0, size: str = "small", workers: int | None = None) -> dict:
    """Write the demo Mid-level and MAESTRO folders under ``out`` (see the module docstring).

    ``size`` is ``"tiny"`` (tests: 40 source + 8 piano clips, 3 performances of ~40 s) or ``"small"``
    (demo: 200 + 24 clips, 8 performances of 60-120 s). ``workers`` threads synthesise and encode in parallel
    (default: CPU count, at most 4); the output does not depend on it. Returns a summary of what was written.
    """
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; choose one of {sorted(SIZES)}")
    t_start = time.perf_counter()
    spec = SIZES[size]
    out = Path(out).expanduser().resolve()
    mid_root, mae_root = out / "midlevel", out / "maestro"
    (mid_root / midlevel_fmt.AUDIO_DIR).mkdir(parents=True, exist_ok=True)
    (mid_root / midlevel_fmt.ANNOTATIONS.parent).mkdir(parents=True, exist_ok=True)
    mae_root.mkdir(parents=True, exist_ok=True)
    bank = ToneBank()
    jobs = []

    plan = _clip_plan(seed, spec)
    ratings = []
    for i, row in enumerate(plan.itertuples(index=False)):
        rng = np.random.default_rng([seed, 1, i])
        knobs = rng.random(NUM_FEATURES)
        ratings.append(knobs_to_ratings(knobs, rng))
        path = midlevel_fmt.audio_path(mid_root, str(row.song_id))
        jobs.append((_midlevel_clip, path, row, knobs, rng, bank))

    perf_rows = []
    years = list(MAESTRO_YEARS)
    for k in range(spec.maestro):
        rng = np.random.default_rng([seed, 2, k])
        year = years[k % len(years)]
        seconds = round(float(rng.uniform(*spec.maestro_seconds)), 3)
        name = f"{year}/MIDI-Unprocessed_Demo{k + 1:02d}_MID--AUDIO_{k + 1:02d}_R1_{year}_wav--1"
        perf_rows.append(
            {
                "canonical_composer": f"Demo Composer {'ABCD'[k % 4]}",
                "canonical_title": f"Synthetic Study No. {k + 1}",
                "split": spec.maestro_splits[k % len(spec.maestro_splits)],
                "year": year,
                "midi_filename": f"{name}.midi",
                "audio_filename": f"{name}.wav",
                "duration": seconds,
            }
        )
        (mae_root / str(year)).mkdir(exist_ok=True)
        jobs.append((_maestro_performance, mae_root / f"{name}.wav", seconds, MAESTRO_YEARS[year], rng, bank))

    workers = workers or min(4, os.cpu_count() or 1)
    jobs = jobs[len(plan) :] + jobs[: len(plan)]  # the long performances first: the threads finish together
    with ThreadPoolExecutor(max_workers=workers) as pool:  # numpy, soxr and libsndfile release the GIL
        durations = [f.result() for f in [pool.submit(fn, *args) for fn, *args in jobs]]
    for rec, seconds in zip(perf_rows, durations[: len(perf_rows)], strict=True):
        rec["duration"] = round(seconds, 6)  # what the file holds, like the real CSV

    # CSVs, written like the real ones (annotations header with stray spaces; metadata ';'-separated).
    order = np.argsort(plan["song_id"].to_numpy())
    ann = pd.DataFrame(np.array(ratings)[order], columns=[f" {c}" for c in midlevel_fmt.RATING_COLUMNS])
    ann.insert(0, "song_id", plan["song_id"].to_numpy()[order])
    ann.to_csv(mid_root / midlevel_fmt.ANNOTATIONS, index=False)
    meta = pd.DataFrame(
        {
            "song id": plan["song_id"],
            "file name": [f"{s:05d}.mp3" for s in plan["song_id"]],
            "Source": plan["source"],
            "Artist": plan["artist"],
        }
    ).iloc[order]
    meta.to_csv(mid_root / midlevel_fmt.METADATA, sep=";", index=False)
    piano_ids = sorted(plan.loc[plan["timbre"] == PIANO, "song_id"].tolist())
    pd.DataFrame({"song id": piano_ids}).to_csv(mid_root / "piano_ids.csv", index=False)
    perf = pd.DataFrame(perf_rows, columns=list(maestro_fmt.COLUMNS))
    perf.to_csv(mae_root / maestro_fmt.CSV_NAME, index=False)
    (mae_root / maestro_fmt.JSON_NAME).write_text(perf.to_json(orient="columns"))

    source = plan[plan["timbre"] != PIANO]
    return {
        "out": str(out),
        "seed": seed,
        "size": size,
        "midlevel_root": str(mid_root),
        "piano_ids": str(mid_root / "piano_ids.csv"),
        "maestro_root": str(mae_root),
        "source_clips": len(source),
        "piano_clips": len(piano_ids),
        "artists": int(plan["artist"].nunique()),
        "single_track_artists": int((source["artist"].value_counts() == 1).sum()),
        "maestro_performances": len(perf),
        "maestro_seconds": round(float(perf["duration"].sum()), 3),
        "maestro_splits": perf["split"].value_counts().to_dict(),
        "seconds": round(time.perf_counter() - t_start, 2),
    }
