"""Figures of an evaluation: the paper's Fig. 2 (mean r, piano vs non-piano), Fig. 3 (domain discrepancy), and a
per-feature heat table. Inputs are the tables of ``pipelines/evaluate.py``; outputs are PNG files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mdlda.params import FEATURES

SPLIT_NAMES = {"test": "non-piano test", "piano_test": "piano test"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def bars_r(table: pd.DataFrame, out: Path) -> Path:
    """Grouped bars: mean Pearson r per model, non-piano vs piano test."""
    plt = _plt()
    models = list(dict.fromkeys(table.model))
    splits = [s for s in SPLIT_NAMES if s in set(table.split)]
    x = np.arange(len(models))
    width = 0.8 / max(len(splits), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(models)), 3.4))
    for i, split in enumerate(splits):
        vals = [table[(table.model == m) & (table.split == split)].r_mean.mean() for m in models]
        ax.bar(x + (i - (len(splits) - 1) / 2) * width, vals, width, label=SPLIT_NAMES[split])
    ax.set_xticks(x, models, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean Pearson r (7 features)")
    ax.axhline(0, color="k", lw=0.6)
    ax.legend(fontsize=8)
    return _save(plt, fig, out)


def bars_discrepancy(disc: pd.DataFrame, out: Path) -> Path:
    """Domain discrepancy per model (lower = piano and non-piano embeddings closer)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(disc)), 3.0))
    ax.bar(disc.model, disc.discrepancy, color="#8172b2")
    ax.set_ylabel("D(non-piano, piano)")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    return _save(plt, fig, out)


def heat_table(table: pd.DataFrame, out: Path) -> Path:
    """Per-feature Pearson r, one row per (model, split), values written in the cells."""
    plt = _plt()
    rows = [f"{m} | {SPLIT_NAMES.get(s, s)}" for m, s in zip(table.model, table.split, strict=True)]
    vals = table[[f"r_{f}" for f in FEATURES]].to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(8.5, 0.35 * len(rows) + 1.5))
    im = ax.imshow(vals, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(FEATURES)), [f.replace("_", "\n") for f in FEATURES], fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for (i, j), v in np.ndenumerate(vals):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.03, label="Pearson r")
    return _save(plt, fig, out)
