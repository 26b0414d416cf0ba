"""The written side of `mdlda ablation`: the per-seed and summary tables, the figure, ``ablation.md`` and the
MLflow metrics of the ablation's run (pipelines/ablation.py trains and scores the models)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from rich.console import Console

from mdlda import ablation as stats
from mdlda import ablation_figures as figures

BASELINE = "baseline"
STUDENT = "student"
ORDER = [
    "baseline",
    "baseline+AdaBN",
    "teacher",
    "teacher-ensemble",
    "teacher-ensemble+AdaBN",
    "student",
    "student+AdaBN",
]


@dataclass
class AblationResult:
    per_seed: pd.DataFrame
    summary: pd.DataFrame
    headline: pd.DataFrame
    teachers: pd.DataFrame
    out_dir: Path
    run_id: str


def metric_key(model: str, split: str, metric: str) -> str:
    """The MLflow metric name of one summary number (MLflow allows letters, digits, ``_-./`` and spaces)."""
    return f"{model.replace('+', '_')}.{split}.{metric}"


def write_ablation(
    per_seed: pd.DataFrame, teachers: pd.DataFrame, out: Path, run_id: str, console: Console
) -> AblationResult:
    """The tables, the figure and the report of one ablation into ``out``, logged to the ablation's MLflow run.
    Student variants (rows named ``student-<key>-<value>``) follow the fixed rows and get a table of their own,
    paired to the seed's student."""
    variants = sorted(m for m in set(per_seed.model) if m.startswith(STUDENT + "-"))
    order = {m: i for i, m in enumerate(ORDER + variants)}
    singles = per_seed[~per_seed.model.str.startswith("teacher-ensemble") & (per_seed.model != "teacher")]
    agreement = stats.probe_agreement(singles)
    per_seed = per_seed[per_seed.model.isin(order)]
    per_seed = per_seed.sort_values(["model", "split", "seed"], key=lambda c: c.map(order) if c.name == "model" else c)
    summary = stats.summarize(per_seed, BASELINE)
    head = stats.headline(summary)
    out.mkdir(parents=True, exist_ok=True)
    per_seed.to_csv(out / "per_seed.csv", index=False)
    summary.to_csv(out / "ablation.csv", index=False)
    teachers.to_csv(out / "teachers.csv", index=False)
    singles.to_csv(out / "models.csv", index=False)  # every single model of every seed, teachers one by one
    agreement.to_csv(out / "probe_agreement.csv", index=False)
    n = per_seed.seed.nunique()
    figures.figure(summary, out / "ablation.png", f"mean Pearson r and RMSE ± 95% interval over {n} seeds")
    figures.probe_figure(singles, agreement, out / "probe.png")
    text = _report(per_seed, summary, head, teachers, agreement) + _variants_md(per_seed, variants)
    (out / "ablation.md").write_text(text)
    client = MlflowClient()
    for path in out.iterdir():
        client.log_artifact(run_id, str(path), artifact_path="ablation")
    r = summary[summary.metric.isin(["r_mean", "rmse_mean", "offset_mean", "rank_emb", "rank_out"])]
    now = int(time.time() * 1000)
    metrics = [
        mlflow.entities.Metric(metric_key(row.model, row.split, row.metric), float(row.mean), now, 0)
        for row in r.itertuples()
        if math.isfinite(row.mean)
    ]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id, "FINISHED")
    _print(console, head, out)
    return AblationResult(per_seed, summary, head, teachers, out, run_id)


def _report(per_seed, summary, head, teachers, agreement) -> str:
    n = per_seed.seed.nunique()
    disc = summary[summary.metric.isin(["disc_emb", "disc_out"]) & (summary.split == "piano_test")]
    disc_md = disc.assign(value=[stats._pm(m, c) for m, c in zip(disc["mean"], disc["ci"], strict=True)]).pivot(
        index="model", columns="metric", values="value"
    )
    feats = summary[summary.metric.str.startswith("r_") & (summary.metric != "r_mean")]
    feat_md = feats.assign(value=[f"{m:.2f}" for m in feats["mean"]]).pivot(
        index=["model", "split"], columns="metric", values="value"
    )
    return (
        f"# Ablation over {n} seeds ({', '.join(map(str, sorted(per_seed.seed.unique())))})\n\n"
        "Mean ± 95% t-interval over seeds; Δr is the paired difference to the baseline (same seed, same split). "
        "RMSE in rating points; predicting the training mean gives "
        + _reference(per_seed)
        + ". Offset: mean over the features of |mean prediction - mean rating|, the level part of the RMSE that r "
        "cannot see. On scale: share of outputs inside 1..10.\n\n"
        + stats.markdown(head)
        + "\n## Domain discrepancy (non-piano vs piano test; embedding and outputs)\n\n"
        + stats.markdown(disc_md.reset_index())
        + "\n## Label-free probe: neighbour rank on MAESTRO (lower is better)\n\n"
        + _probe_md(summary, agreement)
        + "\n## Per-feature r (mean over seeds)\n\n"
        + stats.markdown(feat_md.reset_index())
        + "\n## Selected teachers\n\n"
        + stats.markdown(teachers.round(4))
    )


def variant_summary(per_seed: pd.DataFrame, variants: list[str]) -> pd.DataFrame:
    """Each student variant paired to the seed's student (same teachers, same pseudo-labels): the headline with
    "Δr vs student" columns."""
    rows = per_seed[per_seed.model.isin([STUDENT, *variants])]
    head = stats.headline(stats.summarize(rows, STUDENT))
    return head.rename(columns={c: c.replace("vs baseline", "vs student") for c in head.columns})


def _variants_md(per_seed: pd.DataFrame, variants: list[str]) -> str:
    if not variants:
        return ""
    return (
        "\n## Student variants, paired to the student of the same seed\n\n"
        "Each variant is the seed's student config with the named change, distilled from the same teachers' "
        "pseudo-labels; Δr is the paired difference to that seed's student.\n\n"
        + stats.markdown(variant_summary(per_seed, variants))
    )


def _reference(per_seed: pd.DataFrame) -> str:
    """What predicting the training mean gives on each test: RMSE (and its offset, when measured)."""
    parts = []
    for split, g in per_seed[per_seed.model == BASELINE].groupby("split"):
        text = f"RMSE {stats._pm(*stats.t_interval(g.rmse_ref.tolist()), 2)}"
        if "offset_ref" in g:
            text += f", offset {stats._pm(*stats.t_interval(g.offset_ref.tolist()), 2)}"
        parts.append(f"{text} ({'piano' if split == 'piano_test' else 'non-piano'})")
    return "; ".join(parts)


def _probe_md(summary: pd.DataFrame, agreement: pd.DataFrame) -> str:
    """Per model: mean neighbour rank of the embedding and of the outputs; then how well each label-free signal
    agrees with piano test r across the single models."""
    probe = summary[summary.metric.isin(["rank_emb", "rank_out", "rank_chance", "rank_pool"])]
    probe = probe[probe.split == "piano_test"]
    if probe.empty:
        return "No MAESTRO performance with two or more segments: no probe.\n"
    table = probe.assign(value=[stats._pm(m, c, 1) for m, c in zip(probe["mean"], probe["ci"], strict=True)])
    text = stats.markdown(table.pivot(index="model", columns="metric", values="value").reset_index())
    if len(agreement):
        shown = agreement.assign(**{c: agreement[c].map(lambda v: f"{v:+.2f}") for c in ("rho", "rho_within_seed")})
        shown = shown.assign(p=agreement.p.map(lambda v: f"{v:.3f}"))
        text += (
            "\nAgreement with piano test r across single models (Spearman rho; positive = the signal ranks the "
            "models as piano r does):\n\n"
            + stats.markdown(shown[["signal", "description", "n_models", "rho", "p", "rho_within_seed", "n_seeds"]])
        )
    return text


def _print(console: Console, head: pd.DataFrame, out: Path) -> None:
    from rich.table import Table

    t = Table(title="ablation: mean ± 95% interval over seeds (Δr: paired, vs the baseline)")
    for c in head.columns:
        t.add_column(c, justify="left" if c == "model" else "right")
    for row in head.itertuples(index=False):
        t.add_row(*[str(v) for v in row])
    console.print(t)
    console.print(f"ablation results: {out}", soft_wrap=True)
