"""Ray Train student: DDP over two gloo workers against one process on the same data; on the session chain's
shards, two data-parallel workers and a worker killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from mdlda.config import StudentConfig

pytestmark = pytest.mark.slow

TINY = {"width": 4}


_LOADED: dict = {}


def _inputs(first):
    """The session chain's student inputs, loaded once for the module (read-only: 5-10 s of Ray Data work each)."""
    from pipelines.data import frontend_stats, load_stage_data

    if first.workdir not in _LOADED:
        shards = Path(first.workdir) / "shards"
        data = load_stage_data(shards / "midlevel", shards / "pseudolabels", target_labelled=True)
        fstats = frontend_stats(str(shards / "midlevel"), data.source_train, Path(first.workdir) / "cache")
        _LOADED[first.workdir] = (data, fstats)
    return _LOADED[first.workdir]


def _cfg(epochs: int = 3, **kw) -> StudentConfig:
    train = {"max_epochs": epochs, "patience": epochs, "lr_milestones": [2], "lr": 2.0e-3, "batch_size": 4}
    return StudentConfig(model_overrides=TINY, train=train | {"device": "cpu"}, **kw)


# ------------------------------------------------------------------ DDP (2 gloo workers) vs one process
# Two ranks, each given half of every global batch (4 + 4 segments per domain of 8 + 8), against one process
# given the whole batches. What is equal: DDP averages the ranks' gradients, and the mean of the two halves'
# mean-loss gradients is the gradient of the mean loss over the whole batch -- for layers that treat segments
# independently. BatchNorm in train mode normalises over the batch it is given, so a rank normalises over its
# 4 segments, one process over 8: the plain one-process run is *not* what DDP computes. The reference that is:
# one process whose forward splits each domain's batch into the ranks' halves and passes each half separately
# (so each BN sees what it sees on that rank) and concatenates the outputs. Then losses, gradients and weights
# agree up to float32 rounding (the order of the sums differs; Adam's eps of 1e-8 bounds how much a rounding
# difference in a near-zero gradient can change a step), hence the tolerances below; BN running statistics are
# left out (DDP averages the ranks' per epoch, the reference updates them per half).
STEPS, HALF, SECONDS = 5, 4, 2


def _global_batches():
    g = torch.Generator().manual_seed(7)
    n = 22050 * SECONDS
    return [
        {
            "audio": 0.1 * torch.randn(2 * HALF, n, generator=g),
            "labels": 1 + 9 * torch.rand(2 * HALF, 7, generator=g),
            "target_audio": 0.1 * torch.randn(2 * HALF, n, generator=g) * (1 + i % 2),
            "target_labels": 1 + 9 * torch.rand(2 * HALF, 7, generator=g),
        }
        for i in range(STEPS)
    ]


def _ddp_config():
    from mdlda.training import TrainConfig

    # each rank validates on its own batch here, so each would fit its own output calibration: off (the product's
    # ranks validate on the same split and sum their training labels: one calibration)
    return TrainConfig(
        mode="distill", max_epochs=1, lr=3e-3, device="cpu", bn_stats="source", pin_memory=False, calibrate="none"
    )


def _grad_norms(norms: list):
    return lambda params: norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))


def _ddp_worker(config: dict) -> None:
    """Ray Train loop: the shared fit with the student's own DDP wrap, on this rank's half of each batch."""
    import tempfile

    import ray.train
    import torch.distributed as dist

    from mdlda.checkpoints import seed_everything
    from mdlda.models import create_model
    from mdlda.replicas import replica_spread
    from mdlda.training import fit
    from pipelines.student import data_parallel

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(0)
    model = create_model("rfresnet", width=4)
    part = slice(rank * HALF, (rank + 1) * HALF)
    mine = [{k: v[part] for k, v in b.items()} for b in _global_batches()]
    norms: list[float] = []
    res = fit(
        model, lambda e: mine, lambda: mine[:1], _ddp_config(), after_backward=_grad_norms(norms), wrap=data_parallel
    )
    losses = torch.tensor([h["train_loss"] for h in res.history], dtype=torch.float64)
    dist.all_reduce(losses)  # the global loss: the mean of the ranks' (equal-sized) losses
    out = {"world": world, "loss": (losses / world).tolist(), "grad_norms": norms, "spread": replica_spread(model)}
    out["params"] = {k: v.detach().clone() for k, v in model.named_parameters()}
    with tempfile.TemporaryDirectory() as d:
        torch.save(out, f"{d}/out.pt")
        ray.train.report(
            {"spread": out["spread"]}, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None
        )


class _RanksInOneProcess(torch.nn.Module):
    """The reference: each domain's batch split into ``world`` equal parts, each through the pair on its own."""

    def __init__(self, pair, world: int = 2) -> None:
        super().__init__()
        self.pair, self.world = pair, world

    def forward(self, source, target=None, adv_lambda=0.0):
        from mdlda.domain_pair import PairOutput

        parts = [self.pair(s, t) for s, t in zip(source.chunk(self.world), target.chunk(self.world), strict=True)]
        return PairOutput(*(None if f[0] is None else torch.cat(f) for f in zip(*parts, strict=True)))


def _one_process(wrap):
    from mdlda.checkpoints import seed_everything
    from mdlda.models import create_model
    from mdlda.training import fit

    seed_everything(0)
    model = create_model("rfresnet", width=4)
    batches, norms = _global_batches(), []
    res = fit(
        model, lambda e: batches, lambda: batches[:1], _ddp_config(), after_backward=_grad_norms(norms), wrap=wrap
    )
    return [h["train_loss"] for h in res.history], norms, dict(model.named_parameters())


def test_ddp_on_two_gloo_workers_equals_one_process_given_the_ranks_batches(ray_local, tmp_path):
    import sys

    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the loop lives in this test file
    trainer = TorchTrainer(
        _ddp_worker,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="ddp-vs-one", storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    ddp = torch.load(Path(result.checkpoint.path) / "out.pt", weights_only=True)
    assert ddp["world"] == 2 and ddp["spread"] == 0.0  # replicas identical: every parameter and BN buffer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: on a busy 2-CPU box two threads made these 5 steps 40x slower
    try:
        loss, norms, params = _one_process(_RanksInOneProcess)
        plain_loss, _, plain = _one_process(None)
    finally:
        torch.set_num_threads(threads)
    assert len(ddp["grad_norms"]) == len(norms) == STEPS
    # the averaged gradient is the mean of the ranks' (not their sum): per-step norms agree
    assert ddp["grad_norms"] == pytest.approx(norms, rel=1e-4)
    assert ddp["loss"] == pytest.approx(loss, rel=1e-5)
    gap = max((ddp["params"][k] - v).abs().max().item() for k, v in params.items())
    assert gap < 1e-4, gap  # 5 Adam steps of lr 3e-3

    # the comparison can tell: one process with BatchNorm over all 8 segments lands clearly elsewhere
    plain_gap = max((ddp["params"][k] - v).abs().max().item() for k, v in plain.items())
    assert plain_gap > 100 * max(gap, 1e-6), (plain_gap, gap)
    assert plain_loss != pytest.approx(ddp["loss"], rel=1e-3)


def _registered_checkpoints(run_dir: Path) -> int:
    """How many checkpoints Ray Train's controller has registered (what a restart can resume from): its snapshot
    file lists them. A folder on disk is not enough: the controller takes reports in on its next poll, seconds
    after the worker wrote the folder, and a restart before that starts from scratch."""
    try:
        return len(json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return 0


def _kill_a_train_worker_after_a_registered_checkpoint(run_dir: Path, stop: threading.Event, killed: list) -> None:
    """Kill a worker once the controller has registered a checkpoint and at least two epochs are left to restart
    into (a kill after the last report restarts nothing). Ray keeps two checkpoints and deletes older ones, so the
    epochs done are counted by every checkpoint folder name seen so far (names hold a timestamp, not an index)."""
    from tiny_chain import own_ray_process

    since = time.time()  # the earlier DDP test's workers may still be exiting: only this run's worker counts
    seen: set[str] = set()
    while not stop.is_set():
        seen.update(c.name for c in run_dir.glob("checkpoint_*"))
        if len(seen) > KILL_EPOCHS - 3:
            return  # the window was missed: the test says so (killed stays empty)
        if _registered_checkpoints(run_dir) and (p := own_ray_process("ray::RayTrainWorker", since)):
            os.kill(p.pid, signal.SIGKILL)
            killed.append(p.pid)
            return
        time.sleep(0.05)


KILL_EPOCHS = 8  # the controller registers a checkpoint 1-2 tiny epochs after it is written


def test_two_workers_stay_in_sync_and_a_killed_one_restarts_from_the_last_checkpoint(chain, tmp_path):
    """Two data-parallel workers (one run serves both checks: a worker group's start-up is most of its cost), one
    of them SIGKILLed mid-run: the group restarts from the last checkpoint and the replicas stay identical."""
    from pipelines.student import train_student

    first, _ = chain
    data, fstats = _inputs(first)
    stop, killed = threading.Event(), []
    killer = threading.Thread(
        target=_kill_a_train_worker_after_a_registered_checkpoint,
        args=(tmp_path / "killed-worker", stop, killed),
        daemon=True,
    )
    killer.start()
    try:
        cfg = _cfg(KILL_EPOCHS, max_failures=1, num_workers=2, cpus_per_worker=0.5)
        res = train_student(cfg, data, fstats, tmp_path, "killed-worker")
    finally:
        stop.set()
    assert killed, "no Ray Train worker process was found to kill"
    assert res.result.error is None
    # every epoch checked that the replicas' weights and BN statistics are identical (the loop raises otherwise)
    assert res.result.metrics["world_size"] == 2 and res.result.metrics["replica_spread"] == 0.0
    assert res.best_score == res.history.valid_r_mean.max()
    # no epoch lost or repeated across the restart, and the restarted worker group resumed from a checkpoint
    assert list(res.history.epoch) == list(range(KILL_EPOCHS)), res.history
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
