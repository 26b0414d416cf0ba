"""Stage 6, `mdlda evaluate`: per-feature Pearson r and RMSE of registered models on the non-piano test split and
the piano test subset (the paper's Fig. 2 comparison), computed from the models' predictions on the shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mdlda.manifest import ShardError
from mdlda.metrics import rating_metrics
from mdlda.params import FEATURES, PCM_SCALE
from mdlda.tracking import load_served
from pipelines.shards import local_rows

if TYPE_CHECKING:
    from mdlda.config import ChainConfig
    from pipelines.runs import StageContext

EVAL_SPLITS = ("test", "piano_test")


@dataclass
class Predictions:
    """Predictions (1..10) of each model on each split, with the ground truth and clip ids."""

    y_true: dict[str, np.ndarray] = field(default_factory=dict)
    clip_ids: dict[str, list[str]] = field(default_factory=dict)
    y_pred: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)


def pin_models(models: dict[str, str]) -> tuple[dict[str, str], dict[str, dict]]:
    """Resolve every model URI once: ``(name -> pinned URI, name -> identity)``.

    ``models:/NAME@ALIAS`` becomes ``models:/NAME/VERSION`` (the version the alias points at now), so the whole
    evaluation scores one version even if the alias moves meanwhile; the identity (registry version, run,
    checkpoint folder) is what an evaluation's cache is keyed by, never the URI text: after ``@champion`` moves,
    the same command scores the new champion instead of returning the old one's cached rows.
    """
    from mdlda.served import resolve

    pinned, ident = {}, {}
    for name, uri in models.items():
        ref = resolve(uri)
        pinned[name] = f"models:/{ref.version}" if ref.version else uri
        ident[name] = {"version": ref.version, "run_id": ref.run_id, "checkpoint": ref.checkpoint}
    return pinned, ident


def load_split(shards: str | Path, split: str) -> dict[str, np.ndarray]:
    """One evaluation split in memory (int16 audio, labels, ids): test splits are small, and every model then
    reads the same arrays instead of re-reading Parquet."""
    rows = local_rows(shards, [split], ["clip_id", "audio", "labels"])
    if not rows:
        raise ShardError(f"{shards}: the {split} split has no rows to evaluate on")
    return rows


def _batched(model_fn, audio: np.ndarray, batch_size: int) -> np.ndarray:
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(audio), batch_size):
            x = torch.from_numpy(audio[i : i + batch_size].astype(np.float32) / PCM_SCALE)
            outs.append(model_fn(x).float().numpy())
    return np.concatenate(outs)


def predict_splits(
    models: dict[str, str],
    shards: str | Path,
    splits=EVAL_SPLITS,
    batch_size: int = 8,
    ensembles: dict[str, list[str]] | None = None,
    data: dict[str, dict[str, np.ndarray]] | None = None,
) -> Predictions:
    """Run every model (name -> MLflow URI) over each split; ``ensembles`` add mean-of-members rows."""
    data = data or {split: load_split(shards, split) for split in splits}
    out = Predictions()
    for split in splits:
        out.y_true[split] = data[split]["labels"]
        out.clip_ids[split] = data[split]["clip_id"].tolist()
    for name, uri in models.items():
        model = load_served(uri)
        for split in splits:
            out.y_pred[(name, split)] = _batched(model, data[split]["audio"], batch_size)
    for name, members in (ensembles or {}).items():
        for split in splits:
            out.y_pred[(name, split)] = np.mean([out.y_pred[(m, split)] for m in members], axis=0)
    return out


def results_table(preds: Predictions) -> pd.DataFrame:
    """One row per (model, split): mean r, mean RMSE, mean level offset and per-feature r / RMSE / offset (1..10
    scale)."""
    rows = []
    for (name, split), y_pred in preds.y_pred.items():
        rows.append({"model": name, "split": split, "n": len(y_pred), **rating_metrics(preds.y_true[split], y_pred)})
    return pd.DataFrame(rows)


def summary_pivot(table: pd.DataFrame, value: str = "r_mean") -> pd.DataFrame:
    """model x split ``value`` (mean Pearson r by default; the table `make demo` prints)."""
    pivot = table.pivot(index="model", columns="split", values=value)
    order = list(dict.fromkeys(table.model))
    return pivot.reindex(order)[[s for s in EVAL_SPLITS if s in pivot.columns]]


def predictions_frame(preds: Predictions) -> pd.DataFrame:
    """Long table of every prediction (model, split, clip_id, true_<feature>, pred_<feature>)."""
    frames = []
    for (name, split), y_pred in preds.y_pred.items():
        f = pd.DataFrame({"model": name, "split": split, "clip_id": preds.clip_ids[split]})
        for i, feat in enumerate(FEATURES):
            f[f"true_{feat}"] = preds.y_true[split][:, i]
            f[f"pred_{feat}"] = y_pred[:, i]
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def discrepancy_table(
    models: dict[str, str],
    shards: str | Path,
    batch_size: int = 8,
    data: dict[str, dict[str, np.ndarray]] | None = None,
    probe: dict | None = None,
) -> pd.DataFrame:
    """Domain discrepancy D(S', T') = ||mean phi(S') - mean phi(T')||_2 (paper Eq. 1) on each model's embedding,
    S' = the non-piano test split, T' = the piano test subset; and, when ``probe`` (MAESTRO segments of whole
    performances, ``pipelines.scoring.probe_segments``) is given, the label-free neighbour rank (``mdlda.probe``)
    of each model's embedding and outputs on them."""
    import torch

    from mdlda.metrics import domain_discrepancy
    from mdlda.params import LABEL_SCALE
    from mdlda.probe import neighbour_rank
    from mdlda.tracking import load_checkpoint

    data = data or {split: load_split(shards, split) for split in EVAL_SPLITS}
    rows = []
    for name, uri in models.items():
        model = load_checkpoint(uri)
        emb = {split: _batched(model.forward_features, data[split]["audio"], batch_size) for split in EVAL_SPLITS}
        row = {
            "model": name,
            "discrepancy": domain_discrepancy(emb["test"], emb["piano_test"]),
            "n_source": len(emb["test"]),
            "n_target": len(emb["piano_test"]),
        }
        if probe is not None:
            feats = _batched(model.forward_features, probe["audio"], batch_size)
            with torch.no_grad():
                outputs = model.forward_head(torch.from_numpy(feats)).numpy() * LABEL_SCALE
            spaces = {"emb": feats, "out": outputs}
            for space, vectors in spaces.items():
                r = neighbour_rank(vectors, probe["group"], probe["offset_s"])
                row |= {f"rank_{space}": r["rank_mean"], f"rank_{space}_geo": r["rank_geo"], "rank_pool": r["pool"]}
        rows.append(row)
    return pd.DataFrame(rows)


def write_results(
    table: pd.DataFrame, out_dir: Path, preds: Predictions | None = None, disc: pd.DataFrame | None = None
) -> list[Path]:
    """results.{csv,md}, predictions.csv, discrepancy.csv and the figures; returns the paths."""
    from mdlda import report

    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "results.csv"
    table.to_csv(csv, index=False)
    md = out_dir / "results.md"
    cols = ["model", "split", "n", "r_mean", "rmse_mean", "offset_mean", "in_scale"] + [f"r_{f}" for f in FEATURES]
    cols = [c for c in cols if c in table.columns]
    md.write_text(
        table[cols].to_markdown(index=False, floatfmt=".3f")
        if _has_tabulate()
        else table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}")
    )
    paths = [csv, md, report.bars_r(table, out_dir / "mean_r.png"), report.heat_table(table, out_dir / "features.png")]
    if preds is not None:
        predictions_frame(preds).to_csv(out_dir / "predictions.csv", index=False)
        paths.append(out_dir / "predictions.csv")
    if disc is not None and len(disc):
        disc.to_csv(out_dir / "discrepancy.csv", index=False)
        paths += [out_dir / "discrepancy.csv", report.bars_discrepancy(disc, out_dir / "discrepancy.png")]
    return paths


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class EvaluateResult:
    table: pd.DataFrame  # one row per (model, split), as results_table
    did_work: bool


def evaluation_key(resolved: dict[str, dict], ensembles: dict, adabn: list[str], midlevel: str) -> str:
    """The evaluation cache key: the resolved models (``pin_models``' identities, not the URI text), the
    ensembles, the AdaBN rows and the content digest of the shards scored."""
    from mdlda.config import config_digest
    from mdlda.manifest import read_manifest

    shards = read_manifest(midlevel)["content_digest"]
    return config_digest({"models": resolved, "ensembles": ensembles, "adabn": adabn, "shards": shards, "v": 4})


def evaluate_stage(
    models: dict[str, str], ensembles: dict[str, list[str]], adabn: list[str], cfg: ChainConfig, ctx: StageContext
) -> EvaluateResult:
    """Metrics table of all models on test / piano_test (plus ``<name>+AdaBN`` rows for the models named in
    ``adabn``: per-domain BatchNorm statistics) under the stage run; cached by what the models resolve to (registry
    version, run, checkpoint: an alias that moved gives a new evaluation) and the shards' content digest."""
    from pipelines import runs

    with runs.stage(ctx, "evaluate"):
        return _evaluate(models, ensembles, adabn, cfg, ctx.workdir)


def _evaluate(models, ensembles, adabn, cfg: ChainConfig, workdir: Path) -> EvaluateResult:
    import math

    import mlflow

    from mdlda.tracking import load_checkpoint
    from pipelines.scoring import ADAPT_CAP, probe_rows, probe_segments

    midlevel = str(workdir / "shards" / "midlevel")
    models, resolved = pin_models(models)  # every model below is the version the key names, even if an alias moves
    key = evaluation_key(resolved, ensembles, adabn, midlevel)
    out = workdir / "results" / key
    if (out / "results.csv").exists():
        return EvaluateResult(pd.read_csv(out / "results.csv"), False)
    data = {split: load_split(midlevel, split) for split in EVAL_SPLITS}
    preds = predict_splits(models, midlevel, ensembles=ensembles, data=data)
    disc_rows = []
    probe = probe_segments(workdir / "shards" / "maestro", ADAPT_CAP, 2)  # the label-free neighbour rank's segments
    if adabn:
        from mdlda.metrics import domain_discrepancy
        from pipelines.scoring import eval_data, predict_all

        domains = eval_data(workdir, cfg)
        for name in adabn:
            pred, emb = predict_all(load_checkpoint(models[name]), domains, per_domain_bn=True)
            for split in EVAL_SPLITS:
                preds.y_pred[(f"{name}+AdaBN", split)] = pred[split]
            d = domain_discrepancy(emb["test"], emb["piano_test"])
            disc_rows.append({"model": f"{name}+AdaBN", "discrepancy": d, "n_source": len(emb["test"])})
            disc_rows[-1] |= {"n_target": len(emb["piano_test"]), **probe_rows(pred, emb, domains)}
    table = results_table(preds)
    disc = discrepancy_table(models, midlevel, data=data, probe=probe)
    disc = pd.concat([disc, pd.DataFrame(disc_rows)], ignore_index=True)
    for p in write_results(table, out, preds, disc):
        mlflow.log_artifact(str(p))
    for row in disc.to_dict("records"):
        name = row["model"].replace("+", "_")
        mlflow.log_metric(f"{name}.discrepancy", row["discrepancy"])
        for probe_metric in ("rank_emb", "rank_out"):
            if probe_metric in row and math.isfinite(row[probe_metric]):
                mlflow.log_metric(f"{name}.{probe_metric}", row[probe_metric])
    logged = ("r_mean", "rmse_mean", "offset_mean", "in_scale")  # r beside RMSE: r cannot see a level or scale error
    mlflow.log_metrics(
        {
            f"{row['model'].replace('+', '_')}.{row['split']}.{m}": float(row[m])
            for row in table.to_dict("records")
            for m in logged
            if m in row and math.isfinite(row[m])
        }
    )
    (workdir / "results" / "latest").unlink(missing_ok=True)
    (workdir / "results" / "latest").symlink_to(key)
    return EvaluateResult(table, True)
