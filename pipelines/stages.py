"""The chain's stage bodies with their MLflow bookkeeping, shared by `mdlda run` and the single-stage commands.

Each stage runs inside a nested MLflow run (found again by its name under the same parent on a rerun), logs
its resolved config and the manifests it read, and reports whether it did any work.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from mdlda.config import ChainConfig, SweepConfig, config_digest
from mdlda.tracking import STUDENT_MODEL, latest_version, load_checkpoint, log_model, move_champion_if_better
from pipelines.data import StageData, frontend_stats, load_stage_data
from pipelines.prepare import PrepareConfig, prepare
from pipelines.select import TIE_RULE, rank_trials, register_top_k, select_top_k
from pipelines.teachers import run_sweep, summarize

logger = logging.getLogger(__name__)
STAGE_TAG = "mdlda.stage"
CHAIN_TAG = "mdlda.chain"


def parent_run(exp_id: str, key: str, cfg: ChainConfig) -> str:
    """The chain's parent run: reused when this config ran before, created otherwise."""
    client = MlflowClient()
    runs = client.search_runs([exp_id], f"tags.`{CHAIN_TAG}` = '{key}'", max_results=1)
    if runs:
        return runs[0].info.run_id
    run = client.create_run(exp_id, run_name=f"chain-{key[:8]}", tags={CHAIN_TAG: key})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "chain_config.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        client.log_artifact(run.info.run_id, str(path))
    return run.info.run_id


@contextmanager
def stage(exp_id: str, parent_id: str, name: str):
    """A nested run for one stage (reused on reruns); yields the active run."""
    client = MlflowClient()
    runs = client.search_runs(
        [exp_id],
        f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{STAGE_TAG}` = '{name}'",
        max_results=1,
    )
    run_id = runs[0].info.run_id if runs else None
    with mlflow.start_run(run_id=parent_id, experiment_id=exp_id):
        with mlflow.start_run(
            run_id=run_id,
            run_name=None if run_id else name,
            nested=True,
            experiment_id=exp_id,
            tags={STAGE_TAG: name},
        ) as run:
            yield run


def finish_parent(parent_id: str, result) -> None:
    client = MlflowClient()
    client.set_tag(parent_id, "mdlda.student", result.student.get("uri", ""))
    client.set_terminated(parent_id, "FINISHED")


def _log_json(obj, name: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_text(json.dumps(obj, indent=2, default=str))
        mlflow.log_artifact(str(path))


def prepare_all(cfg: ChainConfig, data_root: Path, workdir: Path, run):
    d = cfg.data
    piano = str(data_root / d.piano_ids) if d.piano_ids else None
    ml = prepare(
        PrepareConfig(
            dataset="midlevel",
            root=str(data_root / d.midlevel_root),
            out=str(workdir / "shards" / "midlevel"),
            piano_ids=piano,
            seed=d.seed,
            eval_fraction=d.eval_fraction,
            valid_fraction=d.valid_fraction,
            max_failure_share=d.max_failure_share,
        )
    )
    ma = prepare(
        PrepareConfig(
            dataset="maestro",
            root=str(data_root / d.maestro_root),
            out=str(workdir / "shards" / "maestro"),
            splits=d.maestro_splits,
            max_performances=d.max_performances,
            seed=d.seed,
            max_failure_share=d.max_failure_share,
        )
    )
    for name, r in (("midlevel", ml), ("maestro", ma)):
        _log_json(r.manifest, f"manifest-{name}.json")
        mlflow.log_metrics({f"{name}_{k}_rows": v for k, v in r.manifest["counts"].items()})
        mlflow.log_metric(f"{name}_warnings", r.manifest.get("n_warnings", 0))  # e.g. truncated MAESTRO files
        for w in r.manifest.get("warnings", []):
            logger.warning("prepare %s: %s: %s", name, w["item"], w["reason"])
        mlflow.set_tag(f"shards.{name}.digest", r.manifest["content_digest"])
    return ml, ma


def stage_data(cfg: ChainConfig, midlevel: str, maestro: str) -> StageData:
    return load_stage_data(
        midlevel, maestro, target_splits=cfg.data.maestro_splits, materialize_share=cfg.materialize_share
    )


def frontend_stats_for(midlevel: str, data: StageData, workdir: Path, band_floor: float = 0.1):
    return frontend_stats(midlevel, data.source_train, workdir / "cache", band_floor=band_floor)


def sweep_and_select(
    sweep: SweepConfig,
    name: str,
    data: StageData,
    fstats,
    workdir: Path,
    experiment: str,
    exp_id: str,
    run,
    uri: str,
    k: int,
    registered_model: str = "mdlda-teacher",
):
    """Run/resume the sweep, rank its trials, register the top ``k``; returns (chosen, did_work)."""
    mlflow.log_params(
        {
            "sweep_name": name,
            "num_samples": sweep.num_samples,
            "top_k": k,
            "selection_metric": sweep.metric,
            "selection_mode": sweep.mode_metric,
            "tie_rule": TIE_RULE,
        }
    )
    _log_json(sweep.model_dump(mode="json"), "sweep_config.json")
    _log_json(data.memory, "materialize.json")  # which sets the object store held, and the sizes behind it
    links = log_manifests_read(run, {"midlevel": data.manifests["source"], "maestro": data.manifests["target"]})
    links.update({"lineage.sweep_run": run.info.run_id, "lineage.sweep": name})
    sweep = sweep.model_copy(update={"name": name})
    res = run_sweep(sweep, data, fstats, workdir / "ray_results", experiment, run.info.run_id, uri)
    info = summarize(res.results)
    mlflow.log_metrics({f"trials_{k2}": v for k2, v in info.items() if isinstance(v, int | float) and v is not None})
    # budgets are tags, not params: a rerun of the same sweep may be given another budget
    mlflow.set_tags(
        {
            "budget.max_trials": str(sweep.max_trials),
            "budget.time_budget_s": str(sweep.time_budget_s),
            "budget.stopped_by": res.stopped_by or "",
            "trials_planned": str(res.total),
        }
    )
    table = rank_trials(res.results, sweep.metric, include_cut=sweep.select_cut)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "selection.csv"
        table.drop(columns=["checkpoint"]).to_csv(path, index=False)
        mlflow.log_artifact(str(path))
    # a sweep its budget stopped selects from what finished, even when that is fewer than k
    chosen = select_top_k(table, k, allow_fewer=sweep.allow_fewer or bool(res.stopped_by))
    if len(chosen) < k:
        logger.warning("sweep %s: selecting %d of the %d asked for (%s)", name, len(chosen), k, res.stopped_by)
    if sweep.register_models and len(chosen):
        logger.info("%s: registering the top %d as %s", name, len(chosen), registered_model, extra={"show": True})
    registered = (
        register_top_k(
            chosen,
            res.results,
            sweep.name,
            f"{experiment}/{name}",
            exp_id,
            fstats,
            registered_model=registered_model,
            extra_tags=links,
        )
        if sweep.register_models
        else []
    )
    _log_json(registered, "registered.json")
    return registered, res.ran


def log_manifests_read(run, manifests: dict[str, dict]) -> dict[str, str]:
    """Log the full manifests of the shard sets a stage read (``name`` -> manifest) with its run; return the
    lineage tags naming them (see mdlda/lineage.py)."""
    from mdlda.lineage import manifest_artifact

    for name, manifest in manifests.items():
        _log_json(manifest, manifest_artifact(name))
    parent = MlflowClient().get_run(run.info.run_id).data.tags.get("mlflow.parentRunId", "")
    return {
        "lineage.chain_run": parent,
        "lineage.manifests_run": run.info.run_id,
        **{f"lineage.shards.{name}": m["content_digest"] for name, m in manifests.items()},
    }


def registered_for_sweep(registered_model: str, sweep_id: str) -> list[dict]:
    """Versions of ``registered_model`` tagged with ``sweep_id``, by rank."""
    try:
        versions = MlflowClient().search_model_versions(f"name='{registered_model}'")
    except Exception:
        return []
    found = [
        {**v.tags, "version": str(v.version), "run_id": v.run_id, "uri": f"models:/{registered_model}/{v.version}"}
        for v in versions
        if v.tags.get("sweep_id") == sweep_id
    ]
    return sorted(found, key=lambda t: int(t.get("rank", 0)))


def pseudolabel_stage(cfg: ChainConfig, teacher_uris: list[str], maestro: str, out: Path, data: StageData, uri: str):
    from pipelines.pseudolabel import log_spread, pseudolabel

    res = pseudolabel(
        cfg.pseudolabel,
        teacher_uris,
        maestro,
        out,
        data.counts["source_train"],
        uri,
    )
    mlflow.log_params(
        {
            "teachers": ",".join(teacher_uris),
            "num_segments": res.manifest["rows"],
            "seed": cfg.pseudolabel.seed,
        }
    )
    _log_json(res.manifest, "manifest-pseudolabels.json")
    with tempfile.TemporaryDirectory() as d:
        for p in log_spread(res, Path(d)):
            mlflow.log_artifact(str(p))
    spread = res.manifest["options"]["teacher_spread"]
    mlflow.log_metrics({f"teacher_spread_{k}": v for k, v in spread.items()})
    return res


def student_stage(cfg: ChainConfig, midlevel: str, pseudo: str, fstats, workdir: Path, key: str, run, base: StageData):
    """Distil (or find the already registered) student of this chain; champion alias when it beats the last."""
    from pipelines.data import load_stage_data as _load
    from pipelines.select import best_model_from_checkpoint
    from pipelines.student import initial_weights, student_trial_config, train_student

    client = MlflowClient()
    skey = config_digest({"chain": key, "student": cfg.student.model_dump(mode="json")})
    try:
        found = client.search_model_versions(f"name='{STUDENT_MODEL}' and tags.student_key='{skey}'")
    except Exception:
        found = []
    if found:
        v = max(found, key=lambda x: int(x.version))
        return _student_info(client, v), False
    data = _load(midlevel, pseudo, target_labelled=True, materialize_share=cfg.materialize_share)
    _log_json(data.memory, "materialize.json")
    mlflow.log_params(
        {
            "num_workers": cfg.student.num_workers,
            "use_gpu": cfg.student.use_gpu,
            "mix": cfg.student.mix,
            "weighting": cfg.student.weighting,
            "init": cfg.student.init,
            **{f"train.{k}": v for k, v in student_trial_config(cfg.student).params().items()},
        }
    )
    pseudo_manifest = data.manifests["target"]
    links = log_manifests_read(
        run,
        {"midlevel": data.manifests["source"], "maestro": base.manifests["target"], "pseudolabels": pseudo_manifest},
    )
    links["lineage.teachers"] = ",".join(pseudo_manifest["options"]["teachers"])
    siblings = client.search_runs(
        [run.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{links['lineage.chain_run']}' and tags.`{STAGE_TAG}` = 'pseudolabel'",
        max_results=1,
    )
    if siblings:
        links["lineage.pseudolabel_run"] = siblings[0].info.run_id
    mlflow.set_tags(links)  # on the student run too, so the MLflow UI shows the chain
    teachers = pseudo_manifest["options"]["teachers"]
    if cfg.student.init == "teacher":
        links["lineage.student_init"] = teachers[0]
    init_state = initial_weights(cfg.student, teachers, fstats)
    res = train_student(cfg.student, data, fstats, workdir / "ray_results", f"student-{skey}", init_state)
    history = res.history
    if history is not None:
        for _, row in history.iterrows():
            step = int(row.get("epoch", 0))
            mlflow.log_metrics(
                {
                    c: float(row[c])
                    for c in history.columns
                    if c.startswith(("train_", "valid_", "samples_per_s", "data_wait"))
                    and isinstance(row[c], int | float)
                },
                step=step,
            )
    model = best_model_from_checkpoint(res.checkpoint_dir, student_trial_config(cfg.student), fstats)
    log_model(model, registered_model_name=STUDENT_MODEL if cfg.student.register_models else None)
    v = latest_version(STUDENT_MODEL, run.info.run_id)
    client.set_model_version_tag(STUDENT_MODEL, v.version, "student_key", skey)
    client.set_model_version_tag(STUDENT_MODEL, v.version, "chain", key)
    for tag, value in links.items():
        client.set_model_version_tag(STUDENT_MODEL, v.version, tag, value)
    if cfg.student.champion:
        move_champion_if_better(STUDENT_MODEL, v.version, res.best_score)
    else:
        client.set_model_version_tag(STUDENT_MODEL, v.version, "val_r_mean", f"{res.best_score:.6f}")
    mlflow.log_metric("best_valid_r_mean", res.best_score)
    return _student_info(client, client.get_model_version(STUDENT_MODEL, v.version)), True


def _student_info(client, v) -> dict:
    from mlflow.exceptions import MlflowException

    try:
        champ = client.get_model_version_by_alias(STUDENT_MODEL, "champion").version == v.version
    except MlflowException:
        champ = False
    return {
        "uri": f"models:/{STUDENT_MODEL}/{v.version}",
        "version": v.version,
        "val_r_mean": v.tags.get("val_r_mean", "nan"),
        "champion": champ,
        "run_id": v.run_id,
    }


def evaluation_key(resolved: dict[str, dict], ensembles: dict, adabn: list[str], midlevel: str) -> str:
    """The evaluation cache key: the resolved models (``pin_models``' identities, not the URI text), the
    ensembles, the AdaBN rows and the content digest of the shards scored."""
    from mdlda.manifest import read_manifest

    shards = read_manifest(midlevel)["content_digest"]
    return config_digest({"models": resolved, "ensembles": ensembles, "adabn": adabn, "shards": shards, "v": 4})


def evaluate_stage(
    models: dict[str, str], ensembles: dict[str, list[str]], adabn: list[str], cfg: ChainConfig, workdir: Path
):
    """Metrics table of all models on test / piano_test (plus ``<name>+AdaBN`` rows for the models named in
    ``adabn``: per-domain BatchNorm statistics); cached by what the models resolve to (registry version, run,
    checkpoint: an alias that moved gives a new evaluation) and the shards' content digest."""
    import pandas as pd

    from pipelines.evaluate import (
        EVAL_SPLITS,
        discrepancy_table,
        load_split,
        pin_models,
        predict_splits,
        results_table,
        write_results,
    )

    midlevel = str(workdir / "shards" / "midlevel")
    models, resolved = pin_models(models)  # every model below is the version the key names, even if an alias moves
    key = evaluation_key(resolved, ensembles, adabn, midlevel)
    out = workdir / "results" / key
    if (out / "results.csv").exists():
        return pd.read_csv(out / "results.csv"), False
    data = {split: load_split(midlevel, split) for split in EVAL_SPLITS}
    preds = predict_splits(models, midlevel, ensembles=ensembles, data=data)
    disc_rows = []
    from pipelines.scoring import ADAPT_CAP, probe_rows, probe_segments

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
    for row in table.itertuples():
        mlflow.log_metric(f"{row.model.replace('+', '_')}.{row.split}.r_mean", row.r_mean)
    (workdir / "results" / "latest").unlink(missing_ok=True)
    (workdir / "results" / "latest").symlink_to(key)
    return table, True
