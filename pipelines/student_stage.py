"""The chain's student stage, `mdlda student`: the Ray Train distillation of pipelines/student.py under its stage
run, the student's registration with its lineage tags, and the ``champion`` alias when it beats the last one.

A student is keyed by the chain and its own config (``student_key`` on its version): a rerun finds the registered
version and trains nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from mdlda.config import ChainConfig, StudentConfig, config_digest
from mdlda.tracking import CHAMPION, STUDENT_MODEL, latest_version, log_model, move_champion_if_better
from pipelines import runs
from pipelines.prepare_stage import ChainInputs


@dataclass
class StudentStageResult:
    info: dict  # uri, version, val_r_mean, champion, run_id of the student's registered version
    did_work: bool


def student_stage(
    cfg: ChainConfig, pseudo: Path, inputs: ChainInputs, ctx: runs.StageContext, stage_name: str = "student"
) -> StudentStageResult:
    """Distil (or find the already registered) student of this chain from the pseudo-labels in ``pseudo``, under
    the chain's stage run ``stage_name`` (the ablation's student variants each have their own)."""
    check_pseudo_columns(cfg.student, pseudo)
    client = MlflowClient()
    skey = config_digest({"chain": ctx.key, "student": cfg.student.model_dump(mode="json")})
    with runs.stage(ctx, stage_name) as run:
        try:
            found = client.search_model_versions(f"name='{STUDENT_MODEL}' and tags.student_key='{skey}'")
        except Exception:
            found = []
        if found:
            v = max(found, key=lambda x: int(x.version))
            return StudentStageResult(_student_info(client, v), False)
        version = _train_and_register(cfg, pseudo, inputs, ctx, run, skey)
    return StudentStageResult(_student_info(client, version), True)


def check_pseudo_columns(student: StudentConfig, pseudo: Path) -> None:
    """Before any run starts: ``student.labels: raw`` needs the raw-label column, which pseudo-label folders
    written before it existed lack (the pseudolabel stage rewrites such a folder when the chain runs it)."""
    from pipelines.data import RAW_LABELS, pseudo_extras

    if student.labels == "raw" and RAW_LABELS not in pseudo_extras(pseudo):
        raise ValueError(
            f"student.labels is 'raw', but the pseudo-labels in {pseudo} have no {RAW_LABELS!r} column (written "
            "before it existed): run `mdlda pseudolabel` with the same config first (it rewrites the folder), or "
            "use student.labels: calibrated"
        )


def _train_and_register(cfg: ChainConfig, pseudo: Path, inputs: ChainInputs, ctx: runs.StageContext, run, skey: str):
    from pipelines.data import load_stage_data
    from pipelines.ood_fit import training_ood
    from pipelines.select import best_model_from_checkpoint
    from pipelines.student import initial_weights, student_trial_config, train_student

    client = MlflowClient()
    fstats = inputs.fstats
    data = load_stage_data(
        str(ctx.shards("midlevel")), str(pseudo), target_labelled=True, materialize_share=cfg.materialize_share
    )
    runs.log_json(data.memory, "materialize.json")
    mlflow.log_params(
        {
            "num_workers": cfg.student.num_workers,
            "use_gpu": cfg.student.use_gpu,
            "mix": cfg.student.mix,
            "weighting": cfg.student.weighting,
            "labels": cfg.student.labels,
            "init": cfg.student.init,
            **{f"train.{k}": v for k, v in student_trial_config(cfg.student).params().items()},
        }
    )
    pseudo_manifest = data.manifests["target"]
    links = runs.log_manifests_read(
        run,
        {
            "midlevel": data.manifests["source"],
            "maestro": inputs.data.manifests["target"],
            "pseudolabels": pseudo_manifest,
        },
    )
    links["lineage.teachers"] = ",".join(pseudo_manifest["options"]["teachers"])
    sibling = runs.find_stage_run(run.info.experiment_id, links["lineage.chain_run"], "pseudolabel")
    if sibling:
        links["lineage.pseudolabel_run"] = sibling
    mlflow.set_tags(links)  # on the student run too, so the MLflow UI shows the chain
    teachers = pseudo_manifest["options"]["teachers"]
    if cfg.student.init == "teacher":
        links["lineage.student_init"] = teachers[0]
    init_state = initial_weights(cfg.student, teachers, fstats)
    res = train_student(cfg.student, data, fstats, ctx.workdir / "ray_results", f"student-{skey}", init_state)
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
    (ood,) = training_ood([model], ctx.shards("midlevel"))  # what `mdlda predict` scores windows against
    log_model(model, registered_model_name=STUDENT_MODEL if cfg.student.register_models else None, ood=ood)
    v = latest_version(STUDENT_MODEL, run.info.run_id)
    client.set_model_version_tag(STUDENT_MODEL, v.version, "student_key", skey)
    client.set_model_version_tag(STUDENT_MODEL, v.version, "chain", ctx.key)
    for tag, value in links.items():
        client.set_model_version_tag(STUDENT_MODEL, v.version, tag, value)
    if cfg.student.champion:
        move_champion_if_better(STUDENT_MODEL, v.version, res.best_score)
    else:
        client.set_model_version_tag(STUDENT_MODEL, v.version, "val_r_mean", f"{res.best_score:.6f}")
    mlflow.log_metric("best_valid_r_mean", res.best_score)
    return client.get_model_version(STUDENT_MODEL, v.version)


def _student_info(client, v) -> dict:
    from mlflow.exceptions import MlflowException

    try:
        champ = client.get_model_version_by_alias(STUDENT_MODEL, CHAMPION).version == v.version
    except MlflowException:
        champ = False
    return {
        "uri": f"models:/{STUDENT_MODEL}/{v.version}",
        "version": v.version,
        "val_r_mean": v.tags.get("val_r_mean", "nan"),
        "champion": champ,
        "run_id": v.run_id,
    }
