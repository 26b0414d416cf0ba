"""Predict the 7 mid-level features of whole recordings with a served model, window by window.

A recording of any length, format and sample rate is decoded to 22.05 kHz mono and cut into 15-s windows every
``hop_s`` seconds. The tail after the last full window is covered by one more window aligned to the end of the
recording (so no audio is ignored and no window is padded). A recording shorter than one window is zero-padded
when it is at least ``min_seconds`` long and refused otherwise: a mostly-silent window would be a guess.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from mdlda.audio import AudioError, load
from mdlda.params import FEATURES, SAMPLE_RATE, SEGMENT_SAMPLES


def window_starts(n: int, hop: int) -> list[int]:
    """Start samples of the windows covering ``n`` samples (see the module docstring)."""
    if n <= SEGMENT_SAMPLES:
        return [0]
    starts = list(range(0, n - SEGMENT_SAMPLES + 1, hop))
    if starts[-1] + SEGMENT_SAMPLES < n:
        starts.append(n - SEGMENT_SAMPLES)  # the tail, aligned to the end
    return starts


def windows(x: np.ndarray, hop_s: float, min_seconds: float, name: str = "audio") -> tuple[list[int], np.ndarray]:
    """(start samples, (W, 330750) float32 windows) for one decoded recording."""
    if hop_s <= 0:
        raise ValueError(f"hop must be > 0 s, got {hop_s}")
    n = len(x)
    if n < SEGMENT_SAMPLES:
        if n < min_seconds * SAMPLE_RATE:
            raise AudioError(
                f"{name}: {n / SAMPLE_RATE:.2f} s long, shorter than the {min_seconds:g} s minimum "
                f"(a window is {SEGMENT_SAMPLES / SAMPLE_RATE:.0f} s; shorter audio is zero-padded down to that "
                "minimum)"
            )
        x = np.pad(x, (0, SEGMENT_SAMPLES - n))
    starts = window_starts(len(x), max(1, int(round(hop_s * SAMPLE_RATE))))
    return starts, np.stack([x[s : s + SEGMENT_SAMPLES] for s in starts]).astype(np.float32)


def predict_recording(
    model: Callable,
    path: str | Path,
    hop_s: float = 15.0,
    batch_size: int = 8,
    min_seconds: float = 5.0,
    device: str = "cpu",
) -> pd.DataFrame:
    """One row per window: file, start_s, end_s and the 7 features on the 1..10 scale."""
    import torch

    x = load(path)
    starts, w = windows(x, hop_s, min_seconds, str(path))
    preds = []
    with torch.no_grad():
        for i in range(0, len(w), batch_size):
            batch = torch.from_numpy(w[i : i + batch_size]).to(device)
            preds.append(model(batch).float().cpu().numpy())  # (b, 7)
    p = np.concatenate(preds)
    frame = pd.DataFrame(p, columns=list(FEATURES))
    frame.insert(0, "end_s", [min(s + SEGMENT_SAMPLES, len(x)) / SAMPLE_RATE for s in starts])
    frame.insert(0, "start_s", [s / SAMPLE_RATE for s in starts])
    frame.insert(0, "file", str(path))
    return frame


def time_average(frame: pd.DataFrame) -> pd.DataFrame:
    """Per file, the 7 features averaged over its windows, weighted by the new audio each window covers."""
    rows = []
    for file, g in frame.groupby("file", sort=False):
        prev_end = 0.0
        weights = []
        for s, e in zip(g.start_s, g.end_s, strict=True):
            weights.append(max(e - max(s, prev_end), 1e-6))
            prev_end = e
        w = np.asarray(weights)
        rows.append({"file": file, **{f: float(np.average(g[f], weights=w)) for f in FEATURES}})
    return pd.DataFrame(rows)


def plot_curves(frame: pd.DataFrame, out: str | Path) -> Path:
    """A PNG of the 7 feature curves over time, one panel per file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = list(dict.fromkeys(frame.file))
    fig, axes = plt.subplots(len(files), 1, figsize=(9, 2.8 * len(files)), squeeze=False)
    for ax, file in zip(axes[:, 0], files, strict=True):
        g = frame[frame.file == file]
        mid = (g.start_s + g.end_s) / 2
        for f in FEATURES:
            ax.plot(mid, g[f], marker="o", ms=3, label=f.replace("_", " "))
        ax.set_title(Path(file).name, fontsize=10)
        ax.set_ylabel("rating (1..10)")
        ax.set_ylim(1, 10)
    axes[-1, 0].set_xlabel("time (s), window centres")
    axes[0, 0].legend(ncol=4, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 1.45))
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
