"""The Con Espressione check (Chowdhury & Widmer, ICASSP 2021, section 5): do predicted mid-level features
explain how listeners describe piano performances?

Per model: the 7 features of every performance, time-averaged over its 15-s windows
(:func:`mdlda.predict.predict_recording` + :func:`mdlda.predict.time_average`). Per model and expressive
dimension: an ordinary least-squares regression from the 7 features to the dimension, scored by R2 in sample
(as the paper reports it) and cross-validated with :class:`sklearn.model_selection.GroupKFold` over pieces
(no piece is in the training and the test fold of one split; R2 of the pooled out-of-fold predictions), and
the Pearson r (with its two-sided p-value) of every feature with every dimension. Pairs with p < 0.05 and
|r| > 0.2 are the paper's Table 2.

The input tables come from :mod:`mdlda.datasets.conespressione`; the outputs are CSV, markdown and a PNG.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdlda.datasets.common import skip
from mdlda.datasets.conespressione import DIMENSIONS
from mdlda.params import FEATURES

ALPHA = 0.05
MIN_ABS_R = 0.2
MAX_SPLITS = 5


class ConEspressioneError(ValueError):
    """The data cannot support the analysis (e.g. performances of fewer than two pieces)."""


def check_groups(items: pd.DataFrame) -> None:
    """Refuse data that cannot be cross-validated over pieces or correlated: < 2 pieces or < 3 performances."""
    pieces = items["piece_name"].nunique()
    if pieces < 2:
        found = f"only piece {items['piece_name'].iloc[0]!r}" if len(items) else "no performances"
        raise ConEspressioneError(
            f"the analysis needs performances of at least 2 pieces (cross-validation holds out whole pieces); "
            f"found {found}"
        )
    if len(items) < 3:
        raise ConEspressioneError(f"the analysis needs at least 3 performances, found {len(items)}")


def piece_folds(groups: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """GroupKFold (train, test) index pairs over pieces; ``min(5, pieces)`` splits."""
    from sklearn.model_selection import GroupKFold

    n_splits = min(MAX_SPLITS, len(np.unique(groups)))
    return list(GroupKFold(n_splits=n_splits).split(np.zeros(len(groups)), groups=groups))


def performance_features(
    models: Mapping[str, Callable],
    items: pd.DataFrame,
    hop_s: float = 15.0,
    batch_size: int = 8,
    min_seconds: float = 5.0,
    on_done: Callable[[str, str], None] | None = None,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """One row per (model, performance): model, performance_name, piece_name and the 7 time-averaged features.

    A performance whose audio cannot be decoded (or is too short) is skipped for every model and reported.
    ``on_done(model, performance_name)`` is called after each prediction (a progress bar).
    """
    from mdlda.audio import AudioError
    from mdlda.predict import predict_recording, time_average

    rows, skipped, bad = [], [], set()
    for name, model in models.items():
        for rec in items.itertuples(index=False):
            if rec.performance_name not in bad:
                try:
                    frame = predict_recording(
                        model, rec.path, hop_s=hop_s, batch_size=batch_size, min_seconds=min_seconds
                    )
                except (AudioError, ValueError) as exc:
                    bad.add(rec.performance_name)
                    skipped.append(skip(rec.performance_name, str(exc)))
                else:
                    avg = time_average(frame).iloc[0]
                    rows.append(
                        {
                            "model": name,
                            "performance_name": rec.performance_name,
                            "piece_name": rec.piece_name,
                            **{f: float(avg[f]) for f in FEATURES},
                        }
                    )
            if on_done is not None:
                on_done(name, rec.performance_name)
    features = pd.DataFrame(rows, columns=["model", "performance_name", "piece_name", *FEATURES])
    return features[~features["performance_name"].isin(bad)].reset_index(drop=True), skipped


def _joined(features: pd.DataFrame, dims: pd.DataFrame, model: str) -> pd.DataFrame:
    f = features[features["model"] == model].drop(columns=["piece_name"])
    return f.merge(dims[["performance_name", "piece_name", *DIMENSIONS]], on="performance_name", how="inner")


def regression_table(features: pd.DataFrame, dims: pd.DataFrame) -> pd.DataFrame:
    """Per model and dimension: n, pieces, splits, R2 in sample and cross-validated over pieces.

    ``r2_cv`` is the R2 of the out-of-fold predictions (each performance predicted by the regression fitted on
    the other pieces); ``r2_cv_fold_mean`` the mean of the per-fold R2s (noisy with few performances per piece).
    """
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    rows = []
    for model in dict.fromkeys(features["model"]):
        data = _joined(features, dims, model)
        check_groups(data)
        x = data[list(FEATURES)].to_numpy(dtype=float)  # (n, 7)
        groups = data["piece_name"].to_numpy()
        folds = piece_folds(groups)
        for dim in DIMENSIONS:
            y = data[dim].to_numpy(dtype=float)
            fit = LinearRegression().fit(x, y)
            oof = np.empty_like(y)
            fold_r2 = []
            for train, test in folds:
                pred = LinearRegression().fit(x[train], y[train]).predict(x[test])
                oof[test] = pred
                fold_r2.append(r2_score(y[test], pred) if len(test) > 1 else np.nan)
            rows.append(
                {
                    "model": model,
                    "dimension": dim,
                    "n": len(y),
                    "pieces": len(np.unique(groups)),
                    "splits": len(folds),
                    "r2_in_sample": float(r2_score(y, fit.predict(x))),
                    "r2_cv": float(r2_score(y, oof)),
                    "r2_cv_fold_mean": float(np.nanmean(fold_r2)) if np.isfinite(fold_r2).any() else np.nan,
                }
            )
    return pd.DataFrame(rows)


def correlation_table(
    features: pd.DataFrame, dims: pd.DataFrame, alpha: float = ALPHA, min_abs_r: float = MIN_ABS_R
) -> pd.DataFrame:
    """Per model, feature and dimension: Pearson r, two-sided p and ``significant`` (p < alpha and |r| > min)."""
    from scipy.stats import pearsonr

    rows = []
    for model in dict.fromkeys(features["model"]):
        data = _joined(features, dims, model)
        check_groups(data)
        for feature in FEATURES:
            x = data[feature].to_numpy(dtype=float)
            for dim in DIMENSIONS:
                y = data[dim].to_numpy(dtype=float)
                if np.ptp(x) == 0 or np.ptp(y) == 0:  # a constant column has no correlation
                    r, p = np.nan, np.nan
                else:
                    res = pearsonr(x, y)
                    r, p = float(res.statistic), float(res.pvalue)
                rows.append({"model": model, "feature": feature, "dimension": dim, "n": len(x), "r": r, "p": p})
    table = pd.DataFrame(rows)
    table["significant"] = (table["p"] < alpha) & (table["r"].abs() > min_abs_r)
    return table


def significant_markdown(correlations: pd.DataFrame, alpha: float = ALPHA, min_abs_r: float = MIN_ABS_R) -> str:
    """The significant pairs per model as a markdown table (the paper's Table 2)."""
    lines = [
        "# Con Espressione: mid-level features vs expressive dimensions",
        "",
        f"Pairs with p < {alpha:g} and |r| > {min_abs_r:g} (Pearson r of the time-averaged feature with the "
        "dimension, two-sided p, not corrected for the number of pairs).",
    ]
    for model in dict.fromkeys(correlations["model"]):
        c = correlations[(correlations["model"] == model) & correlations["significant"]]
        n = int(correlations.loc[correlations["model"] == model, "n"].iloc[0])
        lines += ["", f"## {model} (n = {n} performances)", ""]
        if c.empty:
            lines.append("No significant pairs.")
            continue
        lines += ["| dimension | feature | r | p |", "|---|---|---:|---:|"]
        order = c.assign(_a=-c["r"].abs()).sort_values(["dimension", "_a"])
        for rec in order.itertuples(index=False):
            lines.append(f"| {rec.dimension} | {rec.feature.replace('_', ' ')} | {rec.r:+.3f} | {rec.p:.3g} |")
    return "\n".join(lines) + "\n"


def plot_correlations(correlations: pd.DataFrame, out: str | Path) -> Path:
    """Heat maps of r (feature x dimension), one panel per model; significant cells are boxed and starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(correlations["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(1.6 + 3.0 * len(models), 4.2), squeeze=False, sharey=True)
    image = None
    for ax, model in zip(axes[0], models, strict=True):
        c = correlations[correlations["model"] == model]
        r = c.pivot(index="feature", columns="dimension", values="r").loc[list(FEATURES), list(DIMENSIONS)]
        sig = c.pivot(index="feature", columns="dimension", values="significant").loc[r.index, r.columns]
        image = ax.imshow(r.to_numpy(dtype=float), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        for i in range(r.shape[0]):
            for j in range(r.shape[1]):
                v, s = r.iat[i, j], bool(sig.iat[i, j])
                ax.text(
                    j,
                    i,
                    "n/a" if np.isnan(v) else f"{v:+.2f}" + ("*" if s else ""),
                    ha="center",
                    va="center",
                    color="w" if abs(v) > 0.6 else "k",
                    fontsize=7,
                    fontweight="bold" if s else "normal",
                )
                if s:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.6, ec="k"))
        ax.set_xticks(range(len(DIMENSIONS)), DIMENSIONS, fontsize=8)
        ax.set_title(model, fontsize=10)
    axes[0, 0].set_yticks(range(len(FEATURES)), [f.replace("_", " ") for f in FEATURES], fontsize=8)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="Pearson r")
    fig.suptitle(
        f"time-averaged features vs expressive dimensions (* p < {ALPHA:g} and |r| > {MIN_ABS_R:g})", fontsize=9
    )
    out = Path(out)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def write_outputs(
    out_dir: str | Path,
    features: pd.DataFrame,
    regression: pd.DataFrame,
    correlations: pd.DataFrame,
    skipped: list[dict[str, Any]],
) -> dict[str, Path]:
    """Write features.csv, regression.csv, correlations.csv, significant.md, correlations.png, skipped.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "features": out / "features.csv",
        "regression": out / "regression.csv",
        "correlations": out / "correlations.csv",
        "significant": out / "significant.md",
        "figure": out / "correlations.png",
        "skipped": out / "skipped.csv",
    }
    for key, table in (("features", features), ("regression", regression), ("correlations", correlations)):
        table.to_csv(paths[key], index=False)  # full precision: the numbers can be recomputed from features.csv
    paths["significant"].write_text(significant_markdown(correlations))
    plot_correlations(correlations, paths["figure"])
    pd.DataFrame(skipped, columns=["item", "reason", "counts_as_failure"]).to_csv(paths["skipped"], index=False)
    return paths


def analyse(
    models: Mapping[str, Callable],
    items: pd.DataFrame,
    out_dir: str | Path,
    skipped: list[dict[str, Any]] | None = None,
    hop_s: float = 15.0,
    batch_size: int = 8,
    min_seconds: float = 5.0,
    on_done: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Features, regression, correlations and their files for ``items`` (from ``match_audio``).

    Returns ``{"features", "regression", "correlations", "skipped", "paths"}``. Raises
    :class:`ConEspressioneError` when the usable performances span fewer than 2 pieces.
    """
    check_groups(items)
    features, failed = performance_features(models, items, hop_s, batch_size, min_seconds, on_done)
    skipped = [*(skipped or []), *failed]
    check_groups(items[items["performance_name"].isin(features["performance_name"])])
    regression = regression_table(features, items)
    correlations = correlation_table(features, items)
    paths = write_outputs(out_dir, features, regression, correlations, skipped)
    return {
        "features": features,
        "regression": regression,
        "correlations": correlations,
        "skipped": skipped,
        "paths": paths,
    }
