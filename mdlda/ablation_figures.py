"""The ablation's figures: the paper's Fig. 2 with error bars and RMSE beside it, and the label-free probe
against piano test r (inputs: :func:`mdlda.ablation.summarize`'s long table, the per-model table)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mdlda.ablation import PROBES

SPLITS = [("test", "non-piano test", "#4c72b0"), ("piano_test", "piano test", "#dd8452")]
# the probe panels: a signal, whether lower is better; the non-piano r is what selection sees today
PROBE_PANELS = [("rank_emb", True), ("disc_emb", True), ("source_r", False)]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, summary: pd.DataFrame, metric: str, models: list[str], legend: bool) -> None:
    x = np.arange(len(models))
    width = 0.38
    rows = summary[summary.metric == metric]
    for i, (split, label, colour) in enumerate(SPLITS):
        sub = rows[rows.split == split].set_index("model").reindex(models)
        ax.bar(x + (i - 0.5) * width, sub["mean"], width, yerr=sub["ci"].fillna(0.0), capsize=3, color=colour)
        if legend:
            ax.bar(0, 0, 0, color=colour, label=label)  # a legend entry without the error bar
    ax.set_xticks(x, models, rotation=25, ha="right", fontsize=8)


def figure(summary: pd.DataFrame, out, title: str = "") -> None:
    """Mean r per model (non-piano vs piano test) and, beside it, RMSE with the predict-the-training-mean level
    as dashed lines (r cannot see an offset or a scale error; RMSE can); 95% intervals over seeds."""
    plt = _plt()
    r = summary[summary.metric == "r_mean"]
    models = list(dict.fromkeys(r.model))
    has_rmse = (summary.metric == "rmse_mean").any()
    fig, axes = plt.subplots(
        1, 2 if has_rmse else 1, figsize=(max(5.5, 1.15 * len(models)) * (2 if has_rmse else 1), 3.8)
    )
    axes = np.atleast_1d(axes)
    _bars(axes[0], summary, "r_mean", models, legend=True)
    axes[0].set_ylabel("mean Pearson r (7 features)")
    axes[0].axhline(0, color="k", lw=0.6)
    axes[0].legend(fontsize=8)
    if has_rmse:
        _bars(axes[1], summary, "rmse_mean", models, legend=False)
        axes[1].set_ylabel("RMSE (rating points, 1..10 scale)")
        low = summary[summary.metric.isin(["rmse_mean", "rmse_ref"])]["mean"].min()
        if math.isfinite(low):  # differences of a tenth of a point matter: do not start the axis at 0
            axes[1].set_ylim(bottom=0.8 * low)
        ref = summary[summary.metric == "rmse_ref"]
        for split, label, colour in SPLITS:
            level = ref[ref.split == split]["mean"]
            if len(level) and math.isfinite(float(level.iloc[0])):
                axes[1].axhline(float(level.iloc[0]), color=colour, ls="--", lw=1, label=f"{label}: predict the mean")
        axes[1].legend(fontsize=7, loc="lower right")
    n = int(r.n_seeds.max()) if len(r) else 0
    fig.suptitle(title or f"mean ± 95% interval over {n} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _family(model: str) -> str:
    base = model.split("+")[0]
    for name in ("baseline", "teacher", "student"):
        if base.startswith(name):
            return name + (" + AdaBN" if "+AdaBN" in model else "")
    return model


def probe_figure(models: pd.DataFrame, agreement: pd.DataFrame, out, judge: str = "r_mean") -> bool:
    """One panel per label-free signal: each single model of each seed at (signal, piano test ``judge``), with
    Spearman's rho, its p and the number of models from ``agreement`` (:func:`mdlda.ablation.probe_agreement`).
    ``models``: one row per (seed, model, split). False (nothing written) when no signal was measured."""
    piano = models[models.split == "piano_test"].set_index(["seed", "model"])
    source = models[models.split == "test"].set_index(["seed", "model"])[judge].rename("source_r")
    frame = piano.join(source, how="left").reset_index()
    panels = [(s, low) for s, low in PROBE_PANELS if s in frame.columns and frame[s].notna().sum() >= 3]
    if not panels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True)
    axes = np.atleast_1d(axes)
    families = sorted({_family(m) for m in frame.model})
    colours = dict(zip(families, plt.get_cmap("tab10").colors, strict=False))
    stats = agreement.set_index("signal") if len(agreement) else pd.DataFrame()
    for ax, (signal, lower) in zip(axes, panels, strict=True):
        for fam in families:
            sub = frame[frame.model.map(_family) == fam]
            ax.scatter(sub[signal], sub[judge], s=22, color=colours[fam], label=fam, alpha=0.85)
        label = PROBES.get(signal, signal).split(" (")[0]
        ax.set_xlabel(label + (" (lower is better)" if lower else ""), fontsize=8)
        if signal in stats.index:
            row = stats.loc[signal]
            ax.set_title(f"rho {row.rho:+.2f}, p {row.p:.2f}, {int(row.n_models)} models", fontsize=8)
    axes[0].set_ylabel("piano test r (mean over 7 features)")
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle("label-free signals vs piano test r (one point per model and seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True
