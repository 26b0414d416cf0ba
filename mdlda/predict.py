"""Predict the 7 mid-level features of whole recordings with a served model, window by window.

A recording of any length, format and sample rate is decoded to 22.05 kHz mono and cut into 15-s windows every
``hop_s`` seconds. The tail after the last full window is covered by one more window aligned to the end of the
recording (so no audio is ignored and no window is padded). A recording shorter than one window is zero-padded
when it is at least ``min_seconds`` long and refused otherwise: a mostly-silent window would be a guess.
:func:`predict_recording` streams: it decodes block by block and never holds the recording or all its windows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mdlda.audio import AudioError, stream_blocks
from mdlda.params import FEATURES, SAMPLE_RATE, SEGMENT_SAMPLES

if TYPE_CHECKING:
    from mdlda.ood import OodStats


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


def stream_windows(
    blocks: Iterable[np.ndarray], hop_s: float, min_seconds: float, name: str = "audio"
) -> Iterator[tuple[int, np.ndarray, int]]:
    """The windows of :func:`windows` from a stream of decoded blocks, holding at most one window plus a hop and a
    block: ``(start sample, window, samples so far)``; the last item's third value is the recording's length."""
    if hop_s <= 0:
        raise ValueError(f"hop must be > 0 s, got {hop_s}")
    hop = max(1, int(round(hop_s * SAMPLE_RATE)))
    buf, buf_start, n = np.zeros(0, dtype=np.float32), 0, 0
    next_start, last_start = 0, None
    for block in blocks:
        buf = np.concatenate([buf, np.asarray(block, dtype=np.float32)])
        n += len(block)
        while next_start + SEGMENT_SAMPLES <= n:
            yield next_start, buf[next_start - buf_start : next_start - buf_start + SEGMENT_SAMPLES], n
            last_start, next_start = next_start, next_start + hop
        keep = max(buf_start, min(next_start, n - SEGMENT_SAMPLES))  # what a later window (or the tail) needs
        buf, buf_start = buf[keep - buf_start :], keep
    if last_start is None:  # shorter than one window: padded above the minimum, refused below
        if n < min_seconds * SAMPLE_RATE:
            raise AudioError(
                f"{name}: {n / SAMPLE_RATE:.2f} s long, shorter than the {min_seconds:g} s minimum "
                f"(a window is {SEGMENT_SAMPLES / SAMPLE_RATE:.0f} s; shorter audio is zero-padded down to that "
                "minimum)"
            )
        yield 0, np.pad(buf, (0, SEGMENT_SAMPLES - n)), n
    elif last_start + SEGMENT_SAMPLES < n:
        yield n - SEGMENT_SAMPLES, buf[len(buf) - SEGMENT_SAMPLES :], n  # the tail, aligned to the end


def _tapped(blocks: Iterable[np.ndarray], on_block: Callable[[np.ndarray], None]) -> Iterator[np.ndarray]:
    for block in blocks:
        on_block(block)
        yield block


def predict_recording(
    model: Callable,
    path: str | Path,
    hop_s: float = 15.0,
    batch_size: int = 8,
    min_seconds: float = 5.0,
    device: str = "cpu",
    on_block: Callable[[np.ndarray], None] | None = None,
    ood: OodStats | None = None,
) -> pd.DataFrame:
    """One row per window: file, start_s, end_s and the 7 features on the 1..10 scale; with ``ood`` (the model's
    :class:`~mdlda.ood.OodStats`) also ``ood_score``, the window's distance from the training data, and
    ``ood_flag``, True above the statistics' threshold. ``model`` then needs ``rate_and_embed`` (a
    :class:`~mdlda.tracking.RatingModel`).

    The recording is decoded block by block and its windows predicted a batch at a time (:func:`stream_windows`):
    memory does not grow with the recording's length or with a small ``hop_s``. ``on_block`` sees every decoded
    block (22.05 kHz mono float32) in order, so other features can be computed in the same pass.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1 window per forward pass, got {batch_size}")
    starts, preds, scores, batch, n = [], [], [], [], 0

    def flush() -> None:
        with torch.no_grad():
            x = torch.from_numpy(np.stack(batch)).to(device)
            if ood is None:
                preds.append(model(x).float().cpu().numpy())  # (b, 7)
            else:
                ratings, feats = model.rate_and_embed(x)  # (b, 7), (b, D)
                preds.append(ratings.float().cpu().numpy())
                scores.append(ood.score(feats.float().cpu().numpy()))
        batch.clear()

    blocks = stream_blocks(path)
    if on_block is not None:
        blocks = _tapped(blocks, on_block)
    for start, window, so_far in stream_windows(blocks, hop_s, min_seconds, str(path)):
        n = so_far  # the recording's length, once the last window is out
        starts.append(start)
        batch.append(window)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    p = np.concatenate(preds)
    frame = pd.DataFrame(p, columns=list(FEATURES))
    frame.insert(0, "end_s", [min(s + SEGMENT_SAMPLES, n) / SAMPLE_RATE for s in starts])
    frame.insert(0, "start_s", [s / SAMPLE_RATE for s in starts])
    frame.insert(0, "file", str(path))
    if ood is not None:
        frame["ood_score"] = np.concatenate(scores)
        frame["ood_flag"] = ood.flag(frame["ood_score"].to_numpy())
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
