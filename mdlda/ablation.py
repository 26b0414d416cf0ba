"""Statistics of a multi-seed ablation: mean and 95% interval over seeds, paired differences to the baseline.

Input: one row per (seed, model, split) with metric columns (``r_mean``, ``rmse_mean``, ``r_<feature>``, ...), as
``pipelines/ablation.py`` measures them. The interval is Student's t over seeds (``mean +- t_{0.975, n-1} s /
sqrt(n)``); a paired difference takes, per seed, the model's metric minus the baseline's on the same split (the
seeds pair the runs: same data, same sampled configs), then the same interval over seeds. With one seed the
intervals are NaN: one run has no spread to measure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

KEYS = ("seed", "model", "split")


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided ``level`` t interval) of finite ``values``; half-width NaN for n < 2."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if x.size < 2:
        return float(x.mean()), math.nan
    half = stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half)


def metric_columns(per_seed: pd.DataFrame) -> list[str]:
    return [c for c in per_seed.columns if c not in KEYS and pd.api.types.is_numeric_dtype(per_seed[c])]


def summarize(per_seed: pd.DataFrame, baseline: str, level: float = 0.95) -> pd.DataFrame:
    """Long table: one row per (model, split, metric) with ``n_seeds``, ``mean``, ``ci`` (half-width), and the
    paired difference to ``baseline`` (``diff``, ``diff_ci``, ``n_pairs``; NaN for the baseline itself)."""
    missing = [k for k in KEYS if k not in per_seed.columns]
    if missing:
        raise ValueError(f"per-seed table lacks columns {missing}")
    if baseline not in set(per_seed.model):
        raise ValueError(f"baseline {baseline!r} is not among the models {sorted(set(per_seed.model))}")
    metrics = metric_columns(per_seed)
    base = per_seed[per_seed.model == baseline].set_index(["seed", "split"])
    rows = []
    for (model, split), group in per_seed.groupby(["model", "split"], sort=False):
        g = group.set_index("seed")
        for metric in metrics:
            mean, ci = t_interval(g[metric].tolist(), level)
            row = {"model": model, "split": split, "metric": metric, "n_seeds": int(g[metric].notna().sum())}
            row.update(mean=mean, ci=ci, diff=math.nan, diff_ci=math.nan, n_pairs=0)
            if model != baseline:
                diffs = [
                    g.at[s, metric] - base.at[(s, split), metric]
                    for s in g.index
                    if (s, split) in base.index and math.isfinite(g.at[s, metric])
                ]
                row["diff"], row["diff_ci"] = t_interval(diffs, level)
                row["n_pairs"] = len(diffs)
            rows.append(row)
    return pd.DataFrame(rows)


def _pm(mean: float, ci: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {ci:.{digits}f}" if math.isfinite(ci) else "")


def _signed(mean: float, ci: float) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{mean:+.3f}" + (f" ± {ci:.3f}" if math.isfinite(ci) else "")


def headline(summary: pd.DataFrame, splits: Sequence[str] = ("test", "piano_test")) -> pd.DataFrame:
    """model x (split, quantity) strings: mean r, paired Δr to the baseline, RMSE, level offset (when measured) and
    share on the 1..10 scale."""
    rows = []
    models = list(dict.fromkeys(summary.model))
    for model in models:
        row = {"model": model}
        for split in splits:
            s = summary[(summary.model == model) & (summary.split == split)].set_index("metric")
            if s.empty:
                continue
            name = "piano" if split == "piano_test" else "non-piano"

            def get(metric: str, col: str, frame=s) -> float:
                return float(frame.at[metric, col]) if metric in frame.index else math.nan

            row[f"{name} r"] = _pm(get("r_mean", "mean"), get("r_mean", "ci"))
            row[f"{name} Δr vs baseline"] = _signed(get("r_mean", "diff"), get("r_mean", "diff_ci"))
            row[f"{name} RMSE"] = _pm(get("rmse_mean", "mean"), get("rmse_mean", "ci"), 2)
            if "offset_mean" in s.index:  # mean |mean prediction - mean label|: the level part of the RMSE
                row[f"{name} offset"] = _pm(get("offset_mean", "mean"), get("offset_mean", "ci"), 2)
            row[f"{name} on scale"] = _pm(get("in_scale", "mean"), get("in_scale", "ci"), 3)
            if split == "piano_test" and "in_scale_maestro" in s.index:
                row["MAESTRO on scale"] = _pm(get("in_scale_maestro", "mean"), get("in_scale_maestro", "ci"), 3)
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub table of a small string frame (no extra dependency)."""
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


# label-free signals, lower is better, compared with the piano test r they are meant to stand in for;
# the non-piano test r (what selection on source validation sees) is the reference a probe has to beat
PROBES = {
    "rank_emb": "neighbour rank, embedding",
    "rank_emb_geo": "neighbour rank (geometric mean), embedding",
    "rank_out": "neighbour rank, 7 outputs",
    "rank_out_geo": "neighbour rank (geometric mean), 7 outputs",
    "disc_emb": "domain discrepancy, embedding",
    "disc_out": "domain discrepancy, 7 outputs",
    "source_r": "non-piano test r (higher is better; the source-side reference)",
}


def probe_agreement(models: pd.DataFrame, judge: str = "r_mean") -> pd.DataFrame:
    """How well each label-free signal ranks the models as the piano test ``judge`` does.

    ``models``: one row per (seed, model, split) of single models (no ensembles). Per signal: Spearman's rho
    between the signal (negated when lower is better, so a positive rho means agreement) and the piano test
    ``judge`` over every (seed, model) pair (``rho``, its ``p`` and ``n_models``), and the mean of the per-seed
    rhos (``rho_within_seed``: seeds differ in difficulty, which a pooled rho can mistake for agreement).
    """
    piano = models[models.split == "piano_test"].set_index(["seed", "model"])
    source = models[models.split == "test"].set_index(["seed", "model"])[judge].rename("source_r")
    frame = piano.join(source, how="left")
    rows = []
    for signal, label in PROBES.items():
        if signal not in frame.columns:
            continue
        sign = 1.0 if signal == "source_r" else -1.0
        ok = frame[[signal, judge]].dropna()
        ok = ok[np.isfinite(ok[signal]) & np.isfinite(ok[judge])]
        if len(ok) < 3:
            continue
        varies = ok[signal].nunique() > 1 and ok[judge].nunique() > 1
        rho, p = stats.spearmanr(sign * ok[signal], ok[judge]) if varies else (math.nan, math.nan)
        within = [
            stats.spearmanr(sign * g[signal], g[judge])[0]
            for _, g in ok.groupby(level="seed")
            if len(g) >= 3 and g[signal].nunique() > 1 and g[judge].nunique() > 1
        ]
        rows.append(
            {
                "signal": signal,
                "description": label,
                "n_models": len(ok),
                "rho": float(rho),
                "p": float(p),
                "rho_within_seed": float(np.nanmean(within)) if within else math.nan,
                "n_seeds": len(within),
            }
        )
    return pd.DataFrame(rows)
