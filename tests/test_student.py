"""Ray Train student on the session chain's shards: two data-parallel workers, and a worker killed mid-run."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mdlda.config import StudentConfig

pytestmark = pytest.mark.slow

TINY = {"width": 4}


def _inputs(first):
    from pipelines.data import frontend_stats, load_stage_data

    shards = Path(first.workdir) / "shards"
    data = load_stage_data(shards / "midlevel", shards / "pseudolabels", target_labelled=True)
    return data, frontend_stats(str(shards / "midlevel"), data.source_train, Path(first.workdir) / "cache")


def _cfg(**kw) -> StudentConfig:
    train = {"max_epochs": 3, "patience": 3, "lr_milestones": [2], "lr": 2.0e-3, "batch_size": 4, "device": "cpu"}
    return StudentConfig(model_overrides=TINY, train=train, **kw)


def test_two_data_parallel_workers_train_in_sync(chain, tmp_path):
    from pipelines.student import train_student

    first, _ = chain
    data, fstats = _inputs(first)
    res = train_student(_cfg(num_workers=2, cpus_per_worker=0.5), data, fstats, tmp_path, "two-workers")
    # every epoch checked that the replicas' weights are identical (the loop raises otherwise)
    assert list(res.history.epoch) == [0, 1, 2] and res.result.metrics["world_size"] == 2
    assert res.best_score == res.history.valid_r_mean.max()


def _kill_a_train_worker_after_two_checkpoints(run_dir: Path, stop: threading.Event, killed: list) -> None:
    from tiny_chain import own_ray_process

    while not stop.is_set():
        # two checkpoints on disk: the first is registered for sure (the newest may still be in upload)
        if len(list(run_dir.glob("checkpoint_*"))) >= 2 and (p := own_ray_process("ray::RayTrainWorker")):
            os.kill(p.pid, signal.SIGKILL)
            killed.append(p.pid)
            return
        time.sleep(0.2)


def test_a_killed_worker_restarts_from_the_last_checkpoint(chain, tmp_path):
    from pipelines.student import train_student

    first, _ = chain
    data, fstats = _inputs(first)
    stop, killed = threading.Event(), []
    killer = threading.Thread(
        target=_kill_a_train_worker_after_two_checkpoints,
        args=(tmp_path / "killed-worker", stop, killed),
        daemon=True,
    )
    killer.start()
    try:
        res = train_student(_cfg(max_failures=1), data, fstats, tmp_path, "killed-worker")
    finally:
        stop.set()
    assert killed, "no Ray Train worker process was found to kill"
    assert res.result.error is None
    # no epoch lost or repeated across the restart, and the restarted worker group resumed from a checkpoint
    assert list(res.history.epoch) == [0, 1, 2], res.history
    assert res.result.metrics["start_epoch"] >= 1, (killed, res.result.metrics)


def test_init_teacher_takes_the_best_teachers_weights_and_refuses_another_architecture(chain):
    import mlflow
    import torch

    from mdlda.served import load_checkpoint
    from pipelines.student import initial_weights

    first, _ = chain
    mlflow.set_tracking_uri(first.tracking_uri)  # the chain's registry, as the other chain tests read it
    teachers = [t["uri"] for t in first.teachers]
    data, fstats = _inputs(first)
    assert initial_weights(_cfg(), teachers, fstats) is None  # scratch: nothing loaded
    state = initial_weights(_cfg(init="teacher"), teachers, fstats)
    best = load_checkpoint(teachers[0]).state_dict()
    assert state.keys() == best.keys() and all(torch.equal(state[k], best[k]) for k in best)
    wider = StudentConfig(model_overrides={"width": 8}, init="teacher")
    with pytest.raises(ValueError, match=f"teacher {teachers[0]} does not have the student's architecture"):
        initial_weights(wider, teachers, fstats)
