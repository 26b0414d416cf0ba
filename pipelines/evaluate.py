"""Stage 6, `mdlda evaluate`: per-feature Pearson r and RMSE of registered models on the non-piano test split and
the piano test subset (the paper's Fig. 2 comparison), computed from the models' predictions on the shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mdlda.metrics import regression_metrics
from mdlda.params import FEATURES, PCM_SCALE
from mdlda.tracking import load_served
from pipelines.shards import read_shards

EVAL_SPLITS = ("test", "piano_test")


@dataclass
class Predictions:
    """Predictions (1..10) of each model on each split, with the ground truth and clip ids."""

    y_true: dict[str, np.ndarray] = field(default_factory=dict)
    clip_ids: dict[str, list[str]] = field(default_factory=dict)
    y_pred: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)


def predict_splits(
    models: dict[str, str],
    shards: str | Path,
    splits=EVAL_SPLITS,
    batch_size: int = 8,
    ensembles: dict[str, list[str]] | None = None,
) -> Predictions:
    """Run every model (name -> MLflow URI) over each split; ``ensembles`` add mean-of-members rows."""
    import torch

    loaded = {name: load_served(uri) for name, uri in models.items()}
    out = Predictions()
    for split in splits:
        ds, _ = read_shards(shards, splits=[split], columns=["clip_id", "audio", "labels"])
        ys, ids, preds = [], [], {name: [] for name in loaded}
        for b in _batches_with_ids(ds, batch_size):
            ys.append(b["labels"])
            ids.extend(b["clip_id"].tolist())
            audio = torch.from_numpy(b["audio"].astype(np.float32) / PCM_SCALE)
            with torch.no_grad():
                for name, model in loaded.items():
                    preds[name].append(model(audio).float().numpy())
        out.y_true[split] = np.concatenate(ys)
        out.clip_ids[split] = ids
        for name in loaded:
            out.y_pred[(name, split)] = np.concatenate(preds[name])
        for name, members in (ensembles or {}).items():
            out.y_pred[(name, split)] = np.mean([out.y_pred[(m, split)] for m in members], axis=0)
    return out


def _batches_with_ids(ds, batch_size: int):
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        b["labels"] = np.stack(b["labels"]).astype(np.float32) if b["labels"].dtype == object else b["labels"]
        yield b


def results_table(preds: Predictions) -> pd.DataFrame:
    """One row per (model, split): mean r, mean RMSE and per-feature r / RMSE (1..10 scale)."""
    rows = []
    for (name, split), y_pred in preds.y_pred.items():
        m = regression_metrics(preds.y_true[split], y_pred)
        rows.append({"model": name, "split": split, "n": len(y_pred), **m})
    return pd.DataFrame(rows)


def summary_pivot(table: pd.DataFrame) -> pd.DataFrame:
    """model x split mean Pearson r (the table `make demo` prints)."""
    pivot = table.pivot(index="model", columns="split", values="r_mean")
    order = list(dict.fromkeys(table.model))
    return pivot.reindex(order)[[s for s in EVAL_SPLITS if s in pivot.columns]]


def write_results(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "results.csv"
    table.to_csv(csv, index=False)
    md = out_dir / "results.md"
    cols = ["model", "split", "n", "r_mean", "rmse_mean"] + [f"r_{f}" for f in FEATURES]
    cols = [c for c in cols if c in table.columns]
    md.write_text(
        table[cols].to_markdown(index=False, floatfmt=".3f")
        if _has_tabulate()
        else table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}")
    )
    return [csv, md]


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
