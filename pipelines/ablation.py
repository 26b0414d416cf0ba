"""`mdlda ablation`: does the domain adaptation pay off? N seeds of baseline, baseline + AdaBN, DANN teachers, their
ensemble and the DA+TS student, each trained by the chain's own stages (Ray Tune trials, Ray Train, the registry),
then scored on the non-piano test split and the piano test subset with intervals over seeds.

Per seed ``s`` the chain config is varied only in its seeds: the source-only RF-ResNet baseline trains with seed
``s``, the teacher sweep draws its trial configs with ``search_seed = s``, the pseudo-label subset and the student
use ``s``. Every seed is a chain of its own (its own MLflow parent run, nested under the ablation's run, and its own
pseudo-label shards); a rerun resumes each of them stage by stage. Ablation students never move the registry's
``champion`` alias.

Rows of the results (``results/ablation/<digest>/``, ``results/ablation/latest`` the newest):

- ``baseline``: the source-only RF-ResNet, BN running statistics as trained;
- ``baseline+AdaBN``: the same weights with every BatchNorm's statistics recomputed per domain (on the source
  training set for the non-piano test, on MAESTRO segments for the piano test; Li et al. 2016);
- ``teacher``: a single DANN teacher (the mean over the k selected teachers of each one's metric);
- ``teacher-ensemble``: the mean prediction of the k teachers (what the student learns from);
- ``student`` (DA+TS), and ``student+AdaBN``, ``teacher-ensemble+AdaBN`` (does per-domain BN help the DA models?).

Metrics: Pearson r and RMSE per feature and averaged, ``in_scale`` (share of outputs inside 1..10) on both tests
and on MAESTRO test-split segments (``in_scale_maestro``, what ``mdlda predict`` sees on piano recordings),
``rmse_ref`` (predicting the training mean), and the domain discrepancy (paper Eq. 1) between non-piano and piano
test clips on the 512-d embedding (``disc_emb``) and on the 7 outputs (``disc_out``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from rich.console import Console

from mdlda import ablation as stats
from mdlda.config import ChainConfig, SweepConfig, config_digest, identity
from mdlda.tracking import load_checkpoint
from pipelines.chain import Chain
from pipelines.scoring import EvalData, eval_data, metric_rows, predict_all

logger = logging.getLogger(__name__)
ABLATION_TAG = "mdlda.ablation"
BASELINE = "baseline"


@dataclass
class AblationResult:
    per_seed: pd.DataFrame
    summary: pd.DataFrame
    headline: pd.DataFrame
    teachers: pd.DataFrame
    out_dir: Path
    run_id: str


def _fixed_seed(search: dict, seed: int) -> dict:
    return {**search, "seed": seed}


def baseline_sweep(cfg: ChainConfig, seed: int) -> SweepConfig:
    """The source-only RF-ResNet of seed ``seed``: the config's first baseline of the teachers' model (else the
    teacher sweep without the adversary), one trial."""
    found = [b for b in cfg.baselines if b.model == cfg.teachers.model]
    if found:
        base = found[0]
    else:
        search = {k: v for k, v in cfg.teachers.search.items() if k != "adv_scale"}
        base = cfg.teachers.model_copy(update={"name": "baseline-" + cfg.teachers.model, "search": search})
    return base.model_copy(
        update={
            "mode": "supervised",
            "num_samples": 1,
            "top_k": 1,
            "search": _fixed_seed({k: v for k, v in base.search.items() if k != "adv_scale"}, seed),
            "search_seed": seed,
            "scheduler": "fifo",
        }
    )


def seed_config(cfg: ChainConfig, seed: int) -> ChainConfig:
    """The chain config of ablation seed ``seed``: only the seeds differ from ``cfg``."""
    student_train = cfg.student.train.model_copy(update={"seed": seed})
    return cfg.model_copy(
        update={
            "baselines": [baseline_sweep(cfg, seed)],
            "teachers": cfg.teachers.model_copy(update={"search_seed": seed}),
            "pseudolabel": cfg.pseudolabel.model_copy(update={"seed": seed}),
            "student": cfg.student.model_copy(update={"train": student_train, "champion": False}),
        },
        deep=True,
    )


def score_seed(seed: int, models: dict[str, str], teachers: list[str], data: EvalData) -> list[dict]:
    """Every ablation row of one seed. ``models``: baseline and student URIs; ``teachers``: the k teacher URIs."""
    rows = []
    loaded = {name: load_checkpoint(uri) for name, uri in models.items()}
    members = [load_checkpoint(uri) for uri in teachers]
    for name, model in loaded.items():
        for adabn in (False, True):
            pred, emb = predict_all(model, data, adabn)
            rows += metric_rows(name + ("+AdaBN" if adabn else ""), seed, data, pred, emb)
    for adabn in (False, True):
        outs = [predict_all(m, data, adabn) for m in members]
        if not adabn:  # a single teacher: each metric averaged over the k teachers
            members_rows = [
                r for i, (p, e) in enumerate(outs) for r in metric_rows(f"teacher-{i + 1}", seed, data, p, e)
            ]
            rows += members_rows  # kept for the probe agreement (models.csv); the tables show their mean
            single = pd.DataFrame(members_rows).drop(columns="model")
            for split, g in single.groupby("split", sort=False):
                rows.append({"seed": seed, "model": "teacher", "split": split, **g.mean(numeric_only=True).to_dict()})
        mean_pred = {k: np.mean([p[k] for p, _ in outs], axis=0) for k in outs[0][0] if outs[0][0][k] is not None}
        rows += metric_rows("teacher-ensemble" + ("+AdaBN" if adabn else ""), seed, data, mean_pred, None)
    for r in rows:
        r["seed"] = seed
    return rows


ORDER = [
    "baseline",
    "baseline+AdaBN",
    "teacher",
    "teacher-ensemble",
    "teacher-ensemble+AdaBN",
    "student",
    "student+AdaBN",
]


def teacher_table(seed: int, teachers: list[dict]) -> list[dict]:
    """The selected teachers of one seed with their searched settings (adversarial weight, lr) from MLflow."""
    client = MlflowClient()
    rows = []
    for t in teachers:
        params = client.get_run(t["run_id"]).data.params if t.get("run_id") else {}
        rows.append(
            {
                "seed": seed,
                "rank": int(t.get("rank", 0)),
                "uri": t["uri"],
                "trial_id": t.get("trial_id"),
                "val_r_mean": float(t.get("val_r_mean", "nan")),
                "adv_scale": float(params.get("adv_scale", "nan")),
                "lr": float(params.get("lr", "nan")),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------- run
def _ablation_run(exp_id: str, key: str, seeds: list[int], cfg: ChainConfig) -> str:
    client = MlflowClient()
    runs = client.search_runs([exp_id], f"tags.`{ABLATION_TAG}` = '{key}'", max_results=1)
    if runs:
        return runs[0].info.run_id
    run = client.create_run(exp_id, run_name=f"ablation-{key[:8]}", tags={ABLATION_TAG: key})
    client.log_param(run.info.run_id, "seeds", ",".join(map(str, seeds)))
    client.log_param(run.info.run_id, "config_digest", config_digest(identity(cfg)))
    return run.info.run_id


def run_ablation(
    cfg: ChainConfig,
    data_root: str | Path,
    workdir: str | Path,
    seeds: list[int],
    address: str | None = None,
    console: Console | None = None,
) -> AblationResult:
    """Train and score every seed (resuming what earlier runs left), then write and log the tables and figure."""
    if len(seeds) != len(set(seeds)) or not seeds:
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    console = console or Console()
    workdir = Path(workdir).resolve()
    per_seed, teacher_rows = [], []
    run_id = None
    data = None
    for i, seed in enumerate(seeds):
        chain = Chain(seed_config(cfg, seed), workdir, address, console)
        if run_id is None:
            key = config_digest({"cfg": identity(cfg), "seeds": seeds})
            run_id = _ablation_run(chain.exp_id, key, seeds, cfg)
        MlflowClient().set_tag(chain.parent, "mlflow.parentRunId", run_id)  # the seed's chain nests under it
        MlflowClient().set_tag(chain.parent, "ablation.seed", str(seed))
        chain.pseudo_name = f"pseudolabels-seed{seed}"
        chain.say(f"[bold]ablation seed {seed}[/] ({i + 1} of {len(seeds)}): chain run {chain.parent}")
        chain.prepare(data_root)
        chain.baselines()
        chain.teachers()
        chain.pseudolabel()
        chain.student()
        if data is None:
            data = eval_data(workdir, cfg)
        base_uri = chain.models[chain.cfg.baselines[0].name]
        teachers = [t["uri"] for t in chain.result.teachers]
        per_seed += score_seed(seed, {BASELINE: base_uri, "student": chain.models["student"]}, teachers, data)
        teacher_rows += teacher_table(seed, chain.result.teachers)
        chain.say(f"ablation seed {seed}: scored")
    out = workdir / "results" / "ablation" / key[:8]
    result = write_ablation(pd.DataFrame(per_seed), pd.DataFrame(teacher_rows), out, run_id, console)
    latest = workdir / "results" / "ablation" / "latest"
    latest.unlink(missing_ok=True)
    latest.symlink_to(key[:8])
    return result


def write_ablation(
    per_seed: pd.DataFrame, teachers: pd.DataFrame, out: Path, run_id: str, console: Console
) -> AblationResult:
    """The tables, the figure and the report of one ablation into ``out``, logged to the ablation's MLflow run."""
    order = {m: i for i, m in enumerate(ORDER)}
    singles = per_seed[~per_seed.model.str.startswith("teacher-ensemble") & (per_seed.model != "teacher")]
    agreement = stats.probe_agreement(singles)
    per_seed = per_seed[per_seed.model.isin(ORDER)]
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
    stats.figure(summary, out / "ablation.png", f"mean Pearson r ± 95% interval over {n} seeds")
    disc = summary[summary.metric.isin(["disc_emb", "disc_out"]) & (summary.split == "piano_test")]
    disc_md = disc.assign(value=[stats._pm(m, c) for m, c in zip(disc["mean"], disc["ci"], strict=True)]).pivot(
        index="model", columns="metric", values="value"
    )
    feats = summary[summary.metric.str.startswith("r_") & (summary.metric != "r_mean")]
    feat_md = feats.assign(value=[f"{m:.2f}" for m in feats["mean"]]).pivot(
        index=["model", "split"], columns="metric", values="value"
    )
    text = (
        f"# Ablation over {n} seeds ({', '.join(map(str, sorted(per_seed.seed.unique())))})\n\n"
        "Mean ± 95% t-interval over seeds; Δr is the paired difference to the baseline (same seed, same split). "
        "RMSE in rating points; predicting the training mean gives "
        + ", ".join(
            f"{stats._pm(*stats.t_interval(g.tolist()), 2)} ({'piano' if split == 'piano_test' else 'non-piano'})"
            for split, g in per_seed[per_seed.model == BASELINE].groupby("split").rmse_ref
        )
        + ". On scale: share of outputs inside 1..10.\n\n"
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
    (out / "ablation.md").write_text(text)
    client = MlflowClient()
    for path in out.iterdir():
        client.log_artifact(run_id, str(path), artifact_path="ablation")
    r = summary[summary.metric.isin(["r_mean", "rmse_mean", "rank_emb", "rank_out"])]
    metrics = [
        mlflow.entities.Metric(f"{row.model.replace('+', '_')}.{row.split}.{row.metric}", float(row.mean), 0, 0)
        for row in r.itertuples()
        if math.isfinite(row.mean)
    ]
    if metrics:
        import time

        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(m.key, m.value, now, 0) for m in metrics])
    client.set_terminated(run_id, "FINISHED")
    _print(console, head, out)
    return AblationResult(per_seed, summary, head, teachers, out, run_id)


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
