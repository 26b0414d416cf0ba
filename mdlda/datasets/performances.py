"""Generated performances of one piece with known differences, for `mdlda compare` (its tests, benchmark, figure).

:func:`generate_performances` composes one piano piece (:func:`mdlda.datasets.demo_synth.compose`, steady
tempo, legato) and renders it three times from the same notes:

- ``A_reference.wav``: as composed;
- ``B_faster_detached.wav``: on a known tempo map (piecewise linear: 1.25x faster in the first half, 1.1x in
  the third quarter, the reference's tempo in the last) and played detached in the reference's
  ``DETACHED_SPAN`` (fractions of the piece): every note there sounds for ``DETACHED_GATE`` of its length;
- ``C_slower.wav``: 0.85x the reference's tempo throughout, the articulation unchanged.

The time maps (reference seconds -> performance seconds) are written to ``time_maps.csv`` (the knots; linear in
between) and returned, so a test can check an alignment against them. The same seed writes identical files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DETACHED_GATE = 0.25  # share of a note's written length that still sounds where B plays detached
DETACHED_SPAN = (0.35, 0.7)  # where B plays detached, as fractions of the reference's length
RATE = 44_100  # written files are 44.1 kHz stereo, like a CD rip: the command has to decode and resample them
TAIL_S = 1.5  # the last notes ring out after the composed length


def time_maps(seconds: float) -> dict[str, np.ndarray]:
    """Knots (K, 2) of reference seconds -> performance seconds for each performance; linear between knots."""
    speeds = ((0.5, 1.25), (0.75, 1.1), (1.0, 1.0))  # up to this fraction of the piece, this much faster
    b, t0, p0 = [(0.0, 0.0)], 0.0, 0.0
    for frac, speed in speeds:
        p0, t0 = p0 + (frac * seconds - t0) / speed, frac * seconds
        b.append((t0, p0))
    return {
        "A_reference": np.array([(0.0, 0.0), (seconds, seconds)]),
        "B_faster_detached": np.array(b),
        "C_slower": np.array([(0.0, 0.0), (seconds, seconds / 0.85)]),
    }


def warp(knots: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Performance seconds of reference seconds ``t`` (linear between the knots, extrapolated at the last slope)."""
    t = np.asarray(t, dtype=np.float64)
    slope = (knots[-1, 1] - knots[-2, 1]) / (knots[-1, 0] - knots[-2, 0])
    inside = np.interp(t, knots[:, 0], knots[:, 1])
    return np.where(t > knots[-1, 0], knots[-1, 1] + slope * (t - knots[-1, 0]), inside)


def generate_performances(out: str | Path, seed: int = 0, seconds: float = 60.0) -> dict[str, Any]:
    """Write the three performances (see the module docstring) and ``time_maps.csv`` into ``out``.

    Returns ``{"files": {name: path}, "maps": {name: knots}, "onsets": reference onsets (s), "detached": (start_s,
    end_s), "bars": path}``: the detached span in reference seconds, and ``A_reference.bars.txt``, the
    reference's bar start times (one per line, for ``mdlda compare --bars``).
    """
    import pandas as pd
    import soundfile as sf
    import soxr

    from mdlda.datasets.demo_synth import PIANO, SR, ToneBank, compose, render

    if seconds < 20:
        raise ValueError(f"a piece of at least 20 s is needed to show passages, got {seconds:g}")
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    # melodious, legato, simple and steady rhythm (no drift: the only tempo changes are the known maps), consonant
    knobs = np.array([0.9, 0.0, 0.2, 1.0, 0.1, 0.9, 0.3])
    score = compose(knobs, seconds - TAIL_S, np.random.default_rng([seed, 20]), PIANO, drums=False)
    notes = score["notes"]  # (N, 5): onset_s, dur_s, pitch, velocity, voice
    lo, hi = DETACHED_SPAN[0] * seconds, DETACHED_SPAN[1] * seconds
    maps, files, rows = time_maps(seconds), {}, []
    bank = ToneBank()
    for name, knots in maps.items():
        played = notes.copy()
        if name.startswith("B_"):
            inside = (played[:, 0] >= lo) & (played[:, 0] < hi)
            played[inside, 1] *= DETACHED_GATE
        start, end = warp(knots, played[:, 0]), warp(knots, played[:, 0] + played[:, 1])
        played[:, 0], played[:, 1] = start, np.maximum(end - start, 0.05)
        length = int(round(float(warp(knots, np.array(seconds))) * SR))
        x = render({**score, "notes": played}, PIANO, length, bank, np.random.default_rng([seed, 21]), pan=True)
        path = out / f"{name}.wav"
        sf.write(str(path), soxr.resample(x, SR, RATE, quality="HQ"), RATE, subtype="PCM_16")
        files[name] = str(path)
        rows += [{"performance": name, "reference_s": r, "performance_s": p} for r, p in knots]
    pd.DataFrame(rows).to_csv(out / "time_maps.csv", index=False)
    bars = out / "A_reference.bars.txt"  # the reference's bar starts: the composer's grid of 4 beats
    bar_s = np.arange(0.0, seconds - TAIL_S, 4 * score["beat"])
    bars.write_text("# bar start times of A_reference.wav (s)\n" + "".join(f"{b:.3f}\n" for b in bar_s))
    return {
        "files": files,
        "maps": maps,
        "onsets": np.unique(notes[:, 0]),
        "detached": (lo, hi),
        "bars": str(bars),
    }
