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
``offset_<feature>`` / ``offset_mean`` (mean prediction minus mean rating: the level part of the RMSE),
``rmse_ref`` and ``offset_ref`` (predicting the training mean), and the domain discrepancy (paper Eq. 1) between
non-piano and piano test clips on the 512-d embedding (``disc_emb``) and on the 7 outputs (``disc_out``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from mlflow.tracking import MlflowClient
from rich.console import Console

from mdlda.config import ChainConfig, ConfigError, SweepConfig, config_digest, identity
from mdlda.tracking import load_checkpoint
from pipelines.ablation_report import BASELINE, STUDENT, AblationResult, write_ablation
from pipelines.chain import Chain
from pipelines.scoring import EvalData, eval_data, metric_rows, predict_all

logger = logging.getLogger(__name__)
ABLATION_TAG = "mdlda.ablation"


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


@dataclass(frozen=True)
class StudentVariant:
    """An extra student per seed: the seed's student config with ``updates`` (dotted keys under ``student:``),
    distilled from the same teachers' pseudo-labels, so a student switch is compared paired over chain seeds."""

    updates: tuple[tuple[str, object], ...]

    @property
    def name(self) -> str:
        """The row name, e.g. ``student-init-scratch`` (safe in MLflow metric names, file names and the console)."""
        parts = [f"{k.replace('.', '-')}-{v}" for k, v in self.updates]
        return "-".join([STUDENT, *parts]).replace("_", "-")


def parse_variant(text: str, cfg: ChainConfig) -> StudentVariant:
    """``"init=scratch,weighting=spread"`` (keys under ``student:``, values in YAML) -> a variant, checked against
    the student config now, before any compute."""
    updates = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in item:
            raise ConfigError(f"student variant {text!r}: expected key=value[,key=value], e.g. init=scratch")
        key, raw = (x.strip() for x in item.split("=", 1))
        updates.append((key, yaml.safe_load(raw)))
    if not updates:
        raise ConfigError(f"student variant {text!r}: no key=value given")
    variant = StudentVariant(tuple(updates))
    if variant_config(cfg, variant).student == cfg.student:
        raise ConfigError(f"student variant {text!r} does not change the student config")
    return variant


def variant_config(cfg: ChainConfig, variant: StudentVariant) -> ChainConfig:
    """``cfg`` with the variant's changes to ``student:`` (validated like the YAML)."""
    data = cfg.model_dump(mode="json")
    for key, value in variant.updates:
        *path, last = key.split(".")
        node = data["student"]
        for part in path:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"student variant: student.{key} is not a key of the student config")
            node = node[part]
        node[last] = value
    try:
        return ChainConfig.model_validate(data)
    except ValueError as exc:
        raise ConfigError(f"student variant {key}={value!r}: {exc}") from exc


@dataclass
class AblationPlan:
    """What one ablation trains: the seeds, extra student variants, and the Ray address (local Ray if None)."""

    seeds: list[int]
    variants: list[StudentVariant] = field(default_factory=list)
    address: str | None = None

    def __post_init__(self) -> None:
        if len(self.seeds) != len(set(self.seeds)) or not self.seeds:
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        names = [v.name for v in self.variants]
        if len(names) != len(set(names)):
            raise ValueError(f"student variants must differ, got {names}")


def variant_students(chain: Chain, variants: list[StudentVariant]) -> dict[str, str]:
    """Train (or find) each variant's student on the chain's pseudo-labels: row name -> registry URI."""
    from pipelines.student_stage import student_stage

    found = {}
    pseudo = chain.shards(chain.pseudo_name)
    for v in variants:
        res = student_stage(variant_config(chain.cfg, v), pseudo, chain.data, chain.ctx, v.name)
        found[v.name] = res.info["uri"]
        chain.say(f"student variant {v.name}: {res.info['uri']}" + ("" if res.did_work else " (up to date)"))
    return found


def run_ablation(
    cfg: ChainConfig, data_root: str | Path, workdir: str | Path, plan: AblationPlan, console: Console | None = None
) -> AblationResult:
    """Train and score every seed (resuming what earlier runs left), then write and log the tables and figure."""
    console = console or Console()
    workdir = Path(workdir).resolve()
    per_seed, teacher_rows = [], []
    run_id = None
    data = None
    seeds = plan.seeds
    for i, seed in enumerate(seeds):
        chain = Chain(seed_config(cfg, seed), workdir, plan.address, console)
        if run_id is None:
            extra = {"variants": [v.name for v in plan.variants]} if plan.variants else {}
            key = config_digest({"cfg": identity(cfg), "seeds": seeds, **extra})
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
        students = {STUDENT: chain.models["student"], **variant_students(chain, plan.variants)}
        if data is None:
            data = eval_data(workdir, cfg)
        base_uri = chain.models[chain.cfg.baselines[0].name]
        teachers = [t["uri"] for t in chain.result.teachers]
        per_seed += score_seed(seed, {BASELINE: base_uri, **students}, teachers, data)
        teacher_rows += teacher_table(seed, chain.result.teachers)
        chain.say(f"ablation seed {seed}: scored")
    out = workdir / "results" / "ablation" / key[:8]
    result = write_ablation(pd.DataFrame(per_seed), pd.DataFrame(teacher_rows), out, run_id, console)
    latest = workdir / "results" / "ablation" / "latest"
    latest.unlink(missing_ok=True)
    latest.symlink_to(key[:8])
    return result
