"""The outputs of :func:`mdlda.compare.compare`: figure (PNG + SVG), CSV tables and a Markdown summary.

| file | what |
|---|---|
| ``compare.png``, ``compare.svg`` | one panel per feature, every recording's curve on the reference's time axis |
| ``curves.csv`` | the aligned curves: reference_s, performance, performance_s, the 7 features |
| ``alignment.csv`` | each performance's time map: performance, reference_s, performance_s |
| ``differences.csv`` | per performance and feature: mean_diff, ci_low, ci_high, windows, block |
| ``passages.csv`` | the ranked passages: performance, feature, start_s, end_s, mean_diff, peak_diff, windows, area |
| ``ood.csv`` | with the model's OOD statistics: per performance, windows, flagged, median_score, max_score, threshold |
| ``summary.md`` | the same in words: "B is more staccato than A in 0:35-1:10 (articulation +1.4)" |
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mdlda.params import FEATURES, SEGMENT_SECONDS


def mmss(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}:{s % 60:02d}"


def bar_range(bars: np.ndarray | None, start: float, end: float) -> str:
    """``" (bars 3-7)"`` for a time range, given bar start times; empty without bars."""
    if bars is None or len(bars) == 0:
        return ""
    a, b = (int(np.searchsorted(bars, x, side="right")) for x in (start, end))
    a = max(a, 1)
    return f" (bar {a})" if a == b else f" (bars {a}-{b})"


def sentence(row, reference: str, bars: np.ndarray | None = None) -> str:
    """``B is more staccato than A in 0:35-1:10 (articulation +1.4)``."""
    from mdlda.compare import WORDS

    word = WORDS[row.feature][0 if row.mean_diff > 0 else 1]
    span = f"{mmss(row.start_s)}-{mmss(row.end_s)}{bar_range(bars, row.start_s, row.end_s)}"
    return (
        f"{row.performance} is {word} than {reference} in {span} ({row.feature.replace('_', ' ')} {row.mean_diff:+.1f})"
    )


def summary_markdown(result, hop_s: float, model_uri: str = "", bars: np.ndarray | None = None) -> str:
    ref = result.reference
    others = [n for n in result.aligned.performance.unique() if n != ref]
    windows = int((result.aligned.performance == ref).sum())
    lines = [
        f"# {', '.join(others)} compared with {ref}",
        "",
        f"Reference: `{ref}`. Model: `{model_uri or 'given'}`. 15-s windows every {hop_s:g} s ({windows} on the "
        "reference); every performance aligned to the reference by chroma DTW (docs/compare.md); times are the "
        "reference's.",
        "",
        "| performance | length | tempo (reference = 1) | alignment resolution | mean path cost |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in others:
        a = result.alignments[name]
        lines.append(
            f"| {name} | {mmss(a.performance_duration)} | {a.reference_duration / a.performance_duration:.2f}x | "
            f"{a.resolution_s:.1f} s | {a.cost:.3f} |"
        )
    diff = result.differences
    lines += [
        "",
        "## Mean difference over the piece",
        "",
        "Performance minus reference, rating points (1..10), with a 95% moving-block bootstrap interval over windows "
        f"(blocks of {int(diff.block.iloc[0])} windows); **bold** where the interval excludes 0.",
        "",
        "| feature | " + " | ".join(others) + " |",
        "|---|" + "---:|" * len(others),
    ]
    for f in FEATURES:
        cells = []
        for name in others:
            r = diff[(diff.performance == name) & (diff.feature == f)].iloc[0]
            if np.isnan(r.ci_low):
                cells.append(f"{r.mean_diff:+.2f} (too few windows for an interval)")
                continue
            text = f"{r.mean_diff:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
            cells.append(f"**{text}**" if r.ci_low > 0 or r.ci_high < 0 else text)
        lines.append(f"| {f.replace('_', ' ')} | " + " | ".join(cells) + " |")
    if result.ood is not None:
        threshold = float(result.ood.threshold.iloc[0])
        lines += [
            "",
            "## How much each performance looks like the training data",
            "",
            f"Distance of each window's embedding from the model's training data (docs/serving.md); above "
            f"{threshold:.2f} a window looks unlike it and its ratings are not reliable.",
            "",
            "| performance | windows above the threshold | median distance | largest distance |",
            "|---|---:|---:|---:|",
        ]
        for row in result.ood.itertuples(index=False):
            lines.append(
                f"| {row.performance} | {row.flagged} of {row.windows} | {row.median_score:.2f} | {row.max_score:.2f} |"
            )
    lines += ["", "## Where they differ most", ""]
    if result.passages.empty:
        lines.append("No passage differs from the reference by the threshold or more in any feature.")
    for k, row in enumerate(result.passages.itertuples(index=False), 1):
        lines.append(f"{k}. {sentence(row, ref, bars)}; peak {row.peak_diff:+.1f} over {row.windows} window(s)")
    return "\n".join(lines) + "\n"


def plot(result, png: Path, svg: Path, bars: np.ndarray | None = None) -> None:
    """One panel per feature, a line per recording (the reference in black), the top passages shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.aligned.performance.unique())
    colours = ["black"] + [f"C{k}" for k in range(len(names) - 1)]
    fig, axes = plt.subplots(len(FEATURES), 1, sharex=True, figsize=(10, 1.7 * len(FEATURES) + 1.2))
    for ax, f in zip(axes, FEATURES, strict=True):
        for name, colour in zip(names, colours, strict=True):
            g = result.aligned[result.aligned.performance == name]
            ax.plot(g.reference_s, g[f], color=colour, lw=2.0 if name == result.reference else 1.3, label=name)
        for row in result.passages[result.passages.feature == f].itertuples(index=False):
            ax.axvspan(row.start_s, row.end_s, color=colours[names.index(row.performance)], alpha=0.12, lw=0)
        if bars is not None:
            for b in bars:
                ax.axvline(b, color="0.85", lw=0.5, zorder=0)
        ax.set_ylabel(f.replace("_", "\n"), fontsize=8)
        ax.tick_params(labelsize=8)
    end = float(result.aligned.reference_s.max() + SEGMENT_SECONDS / 2)
    axes[-1].set_xlim(0, end)
    axes[-1].set_xlabel(f"time in {result.reference} (s); curves at 15-s window centres, shading: ranked passages")
    if bars is not None and len(bars):
        top = axes[0].secondary_xaxis("top")
        every = max(1, len(bars) // 12)
        top.set_xticks(bars[::every], [str(k + 1) for k in range(0, len(bars), every)], fontsize=7)
        top.set_xlabel("bar", fontsize=8)
    axes[0].legend(ncol=len(names), fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.25 if bars is not None else 1))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    fig.savefig(svg)
    plt.close(fig)


def write_outputs(
    result, out: Path, hop_s: float, bars: np.ndarray | None = None, model_uri: str = ""
) -> dict[str, Path]:
    """Write every output into ``out`` (created); returns ``{kind: path}``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {k: out / n for k, n in (("png", "compare.png"), ("svg", "compare.svg"), ("summary", "summary.md"))}
    files |= {k: out / f"{k}.csv" for k in ("curves", "alignment", "differences", "passages")}
    result.aligned.to_csv(files["curves"], index=False, float_format="%.4f")
    maps = [
        pd.DataFrame({"performance": name, "reference_s": a.reference_s, "performance_s": a.performance_s})
        for name, a in result.alignments.items()
    ]
    pd.concat(maps, ignore_index=True).to_csv(files["alignment"], index=False, float_format="%.3f")
    result.differences.to_csv(files["differences"], index=False, float_format="%.4f")
    result.passages.to_csv(files["passages"], index=False, float_format="%.4f")
    if result.ood is not None:
        files["ood"] = out / "ood.csv"
        result.ood.to_csv(files["ood"], index=False, float_format="%.4f")
    files["summary"].write_text(summary_markdown(result, hop_s, model_uri, bars))
    plot(result, files["png"], files["svg"], bars)
    return files
