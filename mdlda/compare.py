"""Comparing performances of one piece: the 7 feature curves of each, on the reference's timeline.

:func:`compare` takes a model (audio (B, 330750) -> 7 features on 1..10, e.g. :func:`mdlda.tracking.load_served`)
and two or more recordings, the first being the reference. For each recording one streamed decode gives both
the model's per-window curves (:func:`mdlda.predict.predict_recording`, 15-s windows every ``hop_s``) and its
chroma frames (:class:`mdlda.align.ChromaStream`); each performance is aligned to the reference by DTW
(:func:`mdlda.align.align`; features, hop and step sizes are documented there and in docs/compare.md).

On the common timeline: the grid is the reference's window centres. A performance's value at a grid point
``t`` is its curve (linear between its own window centres) at the performance time the alignment maps ``t`` to.
Then, per performance and feature:

- the mean difference (performance - reference) over the grid, with a 95% moving-block bootstrap interval over
  windows (blocks of ``ceil(15 s / hop)`` consecutive windows, since windows overlapping by the same audio are
  not independent; seeded, :func:`block_bootstrap`; undefined with fewer than two blocks of windows);
- passages: runs of consecutive grid points where the difference is at least ``min_diff`` rating points with
  one sign, spanning their window centres +- half a hop, ranked by their area (sum of |difference| x hop).

With the model's OOD statistics (:mod:`mdlda.ood`), each recording's windows are also scored for how unlike the
training data they look: :func:`ood_table` gives, per performance, the windows above the threshold and the
median and largest score.

Pure library code: no Ray, no command line, nothing on import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mdlda.align import Alignment, ChromaStream, align
from mdlda.params import FEATURES, SAMPLE_RATE, SEGMENT_SECONDS
from mdlda.predict import predict_recording

if TYPE_CHECKING:
    from mdlda.ood import OodStats

# How a positive / negative difference reads ("B is ... than A"). High articulation is staccato (Mid-level set).
WORDS = {
    "melodiousness": ("more melodious", "less melodious"),
    "articulation": ("more staccato", "more legato"),
    "rhythm_complexity": ("rhythmically more complex", "rhythmically simpler"),
    "rhythm_stability": ("rhythmically steadier", "rhythmically less steady"),
    "dissonance": ("more dissonant", "more consonant"),
    "tonal_stability": ("tonally more stable", "tonally less stable"),
    "minorness": ("more minor-sounding", "more major-sounding"),
}


@dataclass
class Recording:
    """One recording's per-window curves (:func:`predict_recording`'s rows) and chroma frames (12, F)."""

    name: str
    path: str
    curves: pd.DataFrame
    chroma: np.ndarray
    duration: float

    @property
    def centres(self) -> np.ndarray:
        return ((self.curves.start_s + self.curves.end_s) / 2).to_numpy()


@dataclass
class Comparison:
    """What :func:`compare` found; ``files`` are the outputs it wrote (empty when ``out`` was None)."""

    reference: str
    aligned: pd.DataFrame  # reference_s, performance, performance_s, the 7 features
    alignments: dict[str, Alignment]
    differences: pd.DataFrame  # performance, feature, mean_diff, ci_low, ci_high, windows, block
    passages: pd.DataFrame  # performance, feature, start_s, end_s, mean_diff, peak_diff, windows, area
    files: dict[str, Path] = field(default_factory=dict)
    ood: pd.DataFrame | None = None  # performance, windows, flagged, median_score, max_score, threshold


def analyse_recording(
    model: Callable,
    path: str | Path,
    name: str,
    hop_s: float,
    batch_size: int = 8,
    min_seconds: float = 5.0,
    ood: OodStats | None = None,
) -> Recording:
    """Curves (with ``ood_score`` / ``ood_flag`` when ``ood`` is given) and chroma of one recording from a single
    streamed decode."""
    stream = ChromaStream()
    curves = predict_recording(
        model, path, hop_s=hop_s, batch_size=batch_size, min_seconds=min_seconds, on_block=stream.feed, ood=ood
    )
    return Recording(name, str(path), curves, stream.frames(), stream.samples / SAMPLE_RATE)


def aligned_curves(reference: Recording, others: Sequence[Recording], alignments: dict[str, Alignment]) -> pd.DataFrame:
    """Long table: for every reference window centre and recording, its time there and its 7 features."""
    t = reference.centres
    frames = [pd.DataFrame({"reference_s": t, "performance": reference.name, "performance_s": t})]
    frames[0][list(FEATURES)] = reference.curves[list(FEATURES)].to_numpy()
    for rec in others:
        p = alignments[rec.name].to_performance(t)
        frame = pd.DataFrame({"reference_s": t, "performance": rec.name, "performance_s": p})
        for f in FEATURES:
            frame[f] = np.interp(p, rec.centres, rec.curves[f].to_numpy())
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def block_bootstrap(
    d: np.ndarray, block: int, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``d`` and a percentile interval from a moving-block bootstrap.

    Each resample joins ``ceil(n / block)`` blocks of ``block`` consecutive values drawn with replacement (cut
    to ``n``). With fewer than two blocks of values the resamples are nearly all alike and the interval would
    claim a precision the data do not have: it is undefined (NaN) then.
    """
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    block = max(1, int(block))
    if n < 2 * block:
        return (float(d.mean()) if n else float("nan")), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n - block + 1, size=(n_boot, -(-n // block)))  # block starts
    idx = (picks[:, :, None] + np.arange(block)).reshape(n_boot, -1)[:, :n]
    lo, hi = np.quantile(d[idx].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)


def _differences(aligned: pd.DataFrame, reference: str) -> dict[str, np.ndarray]:
    ref = aligned[aligned.performance == reference]
    out = {}
    for name, g in aligned.groupby("performance", sort=False):
        if name != reference:
            out[name] = g[list(FEATURES)].to_numpy() - ref[list(FEATURES)].to_numpy()  # (K, 7)
    return out


def mean_differences(
    aligned: pd.DataFrame, reference: str, hop_s: float, n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Per performance and feature: mean difference to the reference with its block-bootstrap interval."""
    block = int(np.ceil(SEGMENT_SECONDS / hop_s - 1e-9))
    rows = []
    for name, d in _differences(aligned, reference).items():
        for j, f in enumerate(FEATURES):
            mean, lo, hi = block_bootstrap(d[:, j], block, n_boot, seed)
            rows.append(
                {"performance": name, "feature": f, "mean_diff": mean, "ci_low": lo, "ci_high": hi}
                | {"windows": len(d), "block": block}
            )
    return pd.DataFrame(rows)


def find_passages(
    aligned: pd.DataFrame, reference: str, hop_s: float, min_diff: float = 0.5, top: int = 10
) -> pd.DataFrame:
    """The ``top`` passages (reference seconds) where a performance differs most in one feature (see module)."""
    t = aligned.loc[aligned.performance == reference, "reference_s"].to_numpy()
    end_of = float(t[-1] + SEGMENT_SECONDS / 2)
    rows = []
    for name, d in _differences(aligned, reference).items():
        for j, f in enumerate(FEATURES):
            sign = np.where(np.abs(d[:, j]) >= min_diff, np.sign(d[:, j]), 0)
            k = 0
            while k < len(sign):
                if sign[k] == 0:
                    k += 1
                    continue
                e = k
                while e + 1 < len(sign) and sign[e + 1] == sign[k]:
                    e += 1
                run = d[k : e + 1, j]
                rows.append(
                    {
                        "performance": name,
                        "feature": f,
                        "start_s": max(0.0, float(t[k] - hop_s / 2)),
                        "end_s": min(end_of, float(t[e] + hop_s / 2)),
                        "mean_diff": float(run.mean()),
                        "peak_diff": float(run[np.argmax(np.abs(run))]),
                        "windows": e - k + 1,
                        "area": float(np.abs(run).sum() * hop_s),
                    }
                )
                k = e + 1
    columns = ["performance", "feature", "start_s", "end_s", "mean_diff", "peak_diff", "windows", "area"]
    frame = pd.DataFrame(rows, columns=columns)
    return (
        frame.sort_values(["area", "performance", "start_s"], ascending=[False, True, True])
        .head(top)
        .reset_index(drop=True)
    )


def ood_table(recordings: Sequence[Recording], stats: OodStats) -> pd.DataFrame:
    """Per recording: its windows, how many score above the OOD threshold, the median and largest score."""
    rows = []
    for rec in recordings:
        scores = rec.curves["ood_score"].to_numpy()
        rows.append(
            {
                "performance": rec.name,
                "windows": len(scores),
                "flagged": int(stats.flag(scores).sum()),
                "median_score": float(np.median(scores)),
                "max_score": float(scores.max()),
                "threshold": stats.threshold,
            }
        )
    return pd.DataFrame(rows)


def unique_names(paths: Sequence[str | Path]) -> list[str]:
    """File stems, made unique (``take``, ``take-2``, ...) when two files share one."""
    names: list[str] = []
    for p in paths:
        stem, k = Path(p).stem, 1
        name = stem
        while name in names:
            k += 1
            name = f"{stem}-{k}"
        names.append(name)
    return names


def compare(
    model: Callable,
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    hop_s: float = 5.0,
    batch_size: int = 8,
    min_seconds: float = 5.0,
    min_diff: float = 0.5,
    top: int = 10,
    n_boot: int = 2000,
    seed: int = 0,
    bars: np.ndarray | None = None,
    model_uri: str = "",
    on_done: Callable[[str], None] | None = None,
    ood: OodStats | None = None,
) -> Comparison:
    """Compare ``paths[1:]`` with the reference ``paths[0]`` (see the module docstring); with ``out``, write the
    figure (PNG, SVG), the tables (CSV) and a Markdown summary there (:mod:`mdlda.compare_report`).

    ``ood``: the model's OOD statistics; the result's ``ood`` table then scores every performance's windows.
    ``bars``: bar start times of the reference in seconds, if known (shown on the figure and in the summary).
    """
    if len(paths) < 2:
        raise ValueError(f"compare needs a reference and at least one other performance, got {len(paths)} file(s)")
    names = unique_names(paths)
    recordings = []
    for name, path in zip(names, paths, strict=True):
        recordings.append(analyse_recording(model, path, name, hop_s, batch_size, min_seconds, ood))
        if on_done is not None:
            on_done(name)
    reference, others = recordings[0], recordings[1:]
    alignments = {rec.name: align(reference.chroma, rec.chroma, (reference.duration, rec.duration)) for rec in others}
    aligned = aligned_curves(reference, others, alignments)
    result = Comparison(
        reference=reference.name,
        aligned=aligned,
        alignments=alignments,
        differences=mean_differences(aligned, reference.name, hop_s, n_boot, seed),
        passages=find_passages(aligned, reference.name, hop_s, min_diff, top),
        ood=ood_table(recordings, ood) if ood is not None else None,
    )
    if out is not None:
        from mdlda.compare_report import write_outputs

        result.files = write_outputs(result, Path(out), hop_s=hop_s, bars=bars, model_uri=model_uri)
    return result
