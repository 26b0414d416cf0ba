"""Operating sweeps on the session's tiny chain: lineage, reruns of one trial, budgets, lost trials."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from tiny_chain import K, own_ray_process, tiny_chain_config
from typer.testing import CliRunner

from mdlda.config import ChainConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def shards_loaded_once():
    """Every Chain object here reads the session chain's shards with the chain's data settings: they are loaded
    once for the module (loading them is the chain tests' subject; each load costs 5-10 s of Ray Data work)."""
    import pipelines.chain as chain_module

    real, loaded = chain_module.load_inputs, {}

    def once(cfg, workdir, say=lambda msg: None):
        key = (str(workdir), cfg.data.model_dump_json(), cfg.materialize_share, cfg.band_floor)
        if key not in loaded:
            loaded[key] = real(cfg, workdir, say)
        return loaded[key]

    patch = pytest.MonkeyPatch()
    patch.setattr(chain_module, "load_inputs", once)
    yield
    patch.undo()


def _use_store(result):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(result.tracking_uri)
    return MlflowClient(result.tracking_uri)


def _chain_obj(result, cfg: ChainConfig | None = None):
    from pipelines.chain import Chain

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return Chain(cfg or tiny_chain_config(), result.workdir)


# ----------------------------------------------------------------------------------------------------- lineage
def test_lineage_of_the_champion_resolves_every_link(chain):
    from mdlda.lineage import trace
    from mdlda.manifest import read_manifest

    first, _ = chain
    client = _use_store(first)
    tree = trace("models:/mdlda-student@champion", client)
    assert tree.broken() == []
    by_role = {c.role: c for c in tree.children}
    assert by_role["chain"].ref == first.parent_run_id
    for name in ("midlevel", "maestro", "pseudolabels"):  # the digests are those of the shards on disk
        assert (
            by_role[f"shards:{name}"].ref
            == read_manifest(os.path.join(first.workdir, "shards", name))["content_digest"]
        )
    teachers = [c for c in tree.children if c.role.startswith("teacher-")]
    assert [t.ref for t in teachers] == [t["uri"] for t in first.teachers] and len(teachers) == K
    for t in teachers:  # each teacher traced to its trial run, the sweep run and its own shards
        roles = {c.role: c for c in t.children}
        assert roles["trained in"].ok and roles["sweep"].ok and roles["shards:maestro"].ok
    # the same links are tags of the student's run (the MLflow UI shows them)
    run_tags = client.get_run(first.student["run_id"]).data.tags
    assert run_tags["lineage.teachers"] == ",".join(t["uri"] for t in first.teachers)


def test_lineage_command_reports_a_broken_link(chain):
    from pipelines.cli import app

    first, _ = chain
    client = _use_store(first)
    runner = CliRunner()
    ok = runner.invoke(app, ["lineage", "models:/mdlda-student@champion", "--workdir", first.workdir, "--json"])
    assert ok.exit_code == 0, ok.output
    assert '"role": "teacher-1"' in ok.output
    version = first.teachers[0]["version"]
    good = client.get_model_version("mdlda-teacher", version).tags["lineage.shards.midlevel"]
    client.set_model_version_tag("mdlda-teacher", version, "lineage.shards.midlevel", "0" * 64)
    try:
        bad = runner.invoke(app, ["lineage", f"models:/mdlda-teacher/{version}", "--workdir", first.workdir])
    finally:
        client.set_model_version_tag("mdlda-teacher", version, "lineage.shards.midlevel", good)
    assert bad.exit_code == 1
    assert "shards:midlevel" in bad.output and "digest" in bad.output
    unknown = runner.invoke(app, ["lineage", "models:/mdlda-teacher/999", "--workdir", first.workdir])
    assert unknown.exit_code == 1 and "not in the registry" in unknown.output


# ------------------------------------------------------------------------------------------------------ rerun
def test_rerun_of_a_trial_matches_its_logged_scores(chain):
    from pipelines.rerun import RERUN_TOLERANCE

    first, _ = chain
    trial_id = first.teachers[0]["trial_id"]
    obj = _chain_obj(first)
    res = obj.rerun(obj.cfg.teachers, False, trial_id)
    assert len(res.comparison) == 2  # both epochs the trial reported
    assert res.max_abs_diff <= RERUN_TOLERANCE, res.comparison
    assert res.config["train"]["lr"] in (2.0e-3, 3.0e-3)
    with pytest.raises(KeyError, match="no trial"):
        obj.rerun(obj.cfg.teachers, False, "nosuchtrial_00009")


# ----------------------------------------------------------------------------------------------------- budgets
def _budget_config(**budget) -> ChainConfig:
    data = tiny_chain_config().model_dump(mode="json")
    data["teachers"].update(
        name="budgeted",
        top_k=1,
        max_concurrent=1,
        register_models=False,
        search={"lr": {"grid": [2.0e-3, 3.0e-3, 4.0e-3]}, "adv_scale": 0.3, "seed": 1, "batch_size": 4},
        **budget,
    )
    return ChainConfig.model_validate(data)


def test_max_trials_and_time_budget_stop_launching_and_resume(chain):
    from pipelines.sweep_stage import sweep_name
    from pipelines.teachers import stored_trials

    first, _ = chain
    obj = _chain_obj(first, _budget_config(max_trials=1))
    path = os.path.join(first.workdir, "ray_results", sweep_name(obj.cfg.teachers, obj.data[2]))
    chosen = obj.sweep(obj.cfg.teachers, baseline=False)
    assert stored_trials(path) == 1 and chosen == []  # not registered (register_models=False), but selected
    client = _use_store(first)
    stage = client.search_runs(
        [obj.exp_id], f"tags.`mlflow.parentRunId` = '{obj.parent}' and tags.`mdlda.stage` = 'teachers'"
    )[0]
    assert stage.data.tags["budget.stopped_by"] == "max_trials=1 reached"
    assert stage.data.tags["trials_planned"] == "3"
    # a larger budget resumes the same sweep (budgets are not part of its identity): one more trial, not three
    more = _chain_obj(first, _budget_config(max_trials=2))
    assert more.key == obj.key
    more.sweep(more.cfg.teachers, baseline=False)
    assert stored_trials(path) == 2
    # a spent time budget launches nothing and reads the stored sweep back
    spent = _chain_obj(first, _budget_config(time_budget_s=0))
    spent.sweep(spent.cfg.teachers, baseline=False)
    assert stored_trials(path) == 2 and spent.result.did_work["teachers"] is False


# ------------------------------------------------------------------------------------------------- lost trials
ONE_TRIAL = {"lr": 2.0e-3, "adv_scale": 0.3, "seed": 1, "batch_size": 4}


def _run_variant(first, **update):
    """run_sweep of a variant of the tiny chain's teacher sweep on its shards (no selection, no registry)."""
    from pipelines.teachers import SweepPlace, run_sweep

    obj = _chain_obj(first)
    data, fstats, _ = obj.data
    sweep = obj.cfg.teachers.model_copy(update=update)
    place = SweepPlace(os.path.join(first.workdir, "ray_results"), "sweeps", None, obj.uri)
    return run_sweep(sweep, data, fstats, place)


def _kill_first_trial_worker(stop: threading.Event, killed: list) -> None:
    while not stop.is_set():
        if p := own_ray_process("ray::ImplicitFunc.train"):  # a trial worker of this session's Ray only
            time.sleep(1.0)
            os.kill(p.pid, signal.SIGKILL)
            killed.append(p.pid)
            return
        time.sleep(0.2)


def test_a_killed_trial_worker_is_lost_not_failed(chain):
    from pipelines.select import is_lost, rank_trials
    from pipelines.teachers import summarize

    first, _ = chain
    train = tiny_chain_config().teachers.train.model_copy(update={"max_epochs": 50, "patience": 50})
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_trial_worker, args=(stop, killed), daemon=True)
    killer.start()
    try:
        res = _run_variant(first, name="lost-worker", search=ONE_TRIAL, train=train)
    finally:
        stop.set()
    assert killed, "no trial worker process was found to kill"
    [result] = list(res.results)
    assert result.error is not None and is_lost(result.error), repr(result.error)
    assert rank_trials(res.results).status.tolist() == ["lost"]
    assert summarize(res.results) | {"best_valid_r_mean": None} == {
        "trials": 1,
        "finished": 0,
        "failed": 0,
        "lost": 1,
        "best_valid_r_mean": None,
    }


def test_is_lost_tells_worker_loss_from_a_crash():
    from ray.exceptions import ActorDiedError, RayTaskError

    from pipelines.select import is_lost
    from pipelines.trial import TrialDiverged

    assert is_lost(ActorDiedError())
    crash = RayTaskError("train", "Traceback ...\nTrialDiverged: loss is nan", TrialDiverged("loss is nan"))
    assert not is_lost(crash)
    assert not is_lost(ValueError("bad config"))


# ------------------------------------------------------------------------------------ SQLite under many trials
def test_many_concurrent_trials_lose_no_metric_in_the_sqlite_store(chain):
    """8 trials on 8 quarter-CPU slots write to the embedded store at once: every reported point is there."""
    first, _ = chain
    search = {**ONE_TRIAL, "seed": {"randint": [0, 1000]}}
    res = _run_variant(first, name="many-trials", num_samples=8, cpus_per_trial=0.25, search=search)
    assert len(res.results) == 8 and all(r.error is None for r in res.results)
    client = _use_store(first)
    # (the trials' experiment is the active one, MLFLOW_EXPERIMENT_ID, whatever name the callback was given)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.sweep = 'many-trials'")
    assert len(runs) == 8
    by_trial = {r.data.tags["trial_name"]: r for r in runs}
    keys = ("valid_r_mean", "train_loss", "samples_per_s", "data_wait_fraction")
    reported = logged = 0
    for result in res.results:
        frame = result.metrics_dataframe
        run = next(r for name, r in by_trial.items() if name.endswith(result.metrics["trial_id"]))
        for key in keys:
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(list(frame[key]))
            reported += len(frame)
            logged += len(history)
    assert logged == reported == 8 * 2 * len(keys)


# ------------------------------------------------------------------------------------------ killed driver
def test_a_killed_driver_resumes_the_sweep_without_redoing_finished_trials(chain, tmp_path):
    """`mdlda teachers` is SIGKILLed (with its whole process group) once a trial finished; running the same
    command again finishes the sweep from its storage folder and leaves the finished trial as it was. The driver
    joins the session's Ray (as a driver joins a cluster): no second local Ray to start on the 2 CPUs; Ray ends the
    killed driver's trial workers."""
    import subprocess
    import sys
    from pathlib import Path

    import ray
    import yaml

    from pipelines.sweep_stage import sweep_name
    from pipelines.teachers import stored_trials

    first, _ = chain
    cfg = _budget_config()
    cfg = cfg.model_copy(update={"teachers": cfg.teachers.model_copy(update={"name": "killed-driver"})})
    config = tmp_path / "chain.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    obj = _chain_obj(first, cfg)
    path = Path(first.workdir) / "ray_results" / sweep_name(cfg.teachers, obj.data[2])
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "pipelines.cli", "teachers", "--config", str(config), "--workdir", first.workdir]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = None
    deadline = time.monotonic() + 600
    try:
        while done is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            for progress in path.glob("*/progress.csv"):
                if len(progress.read_text().splitlines()) == 1 + 2:  # header + both epochs
                    done = progress
                    break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert done is not None, f"no trial finished before the kill (rc {proc.returncode}): {proc.stderr.read()[-2000:]}"
    assert stored_trials(path) < 3, "the driver was killed too late to test a resume"
    before = done.read_text()
    obj.sweep(cfg.teachers, baseline=False)  # the same command, run again (here in-process)
    assert stored_trials(path) == 3
    assert done.read_text() == before  # the finished trial was not run again
    from ray.tune import ExperimentAnalysis

    assert {t.status for t in ExperimentAnalysis(str(path)).trials} == {"TERMINATED"}
