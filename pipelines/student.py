"""Stage 5, `mdlda student`: Ray Train distils one RF-ResNet on labelled source + pseudo-labelled piano segments.

Data-parallel over ``num_workers`` (CPU or GPU by config) with Ray Train's own DDP: each worker reads its shard of
the source and the pseudo-labelled target through ``get_dataset_shard`` and validates on the whole validation
split. The shared loop puts the model into a :class:`mdlda.domain_pair.DomainPair` (both domains in one forward
call, each in its own pass) and :func:`data_parallel` wraps that with ``ray.train.torch.prepare_model``, so DDP
averages the gradients in buckets while the backward runs (gloo on CPU, NCCL on GPU); BatchNorm statistics are
averaged across ranks after every epoch (:mod:`mdlda.replicas`), so every rank takes the same early-stopping
decision, and each epoch checks that the replicas are still identical. Rank 0 checkpoints every epoch (the
unwrapped model's state dict); a failed worker group restarts from the last checkpoint (FailureConfig), and
rerunning the same command resumes the same run.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import DataConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from mdlda.batches import pseudo_labels, spread_weighted
from mdlda.checkpoints import load_training_state, save_training_state, seed_everything
from mdlda.config import StudentConfig, TrialConfig
from mdlda.replicas import replica_spread
from pipelines.batches import Sampling, pooled_batches, train_batches, valid_batches
from pipelines.data import StageData
from pipelines.progress import watched_queue
from pipelines.trial import build_model

logger = logging.getLogger("mdlda.student")


@dataclass
class StudentResult:
    result: Any  # ray.train.Result
    path: str
    best_score: float
    checkpoint_dir: str
    history: Any = None  # pandas DataFrame: every epoch's metrics, also those before a restart


def data_parallel(pair: torch.nn.Module, sync_batchnorm: bool = False) -> torch.nn.Module:
    """``fit``'s ``wrap``: the :class:`~mdlda.domain_pair.DomainPair` in DDP via ``ray.train.torch.prepare_model``
    (one rank: returned as it is). All parameters take part in every step (the student has no domain head), so
    DDP needs no unused-parameter search; ``broadcast_buffers=False``: see :mod:`mdlda.replicas`.

    ``sync_batchnorm`` (``student.sync_batchnorm``, off by default) turns every BatchNorm into a SyncBatchNorm, which
    normalises over the *global* batch of a pass (all ranks' segments) instead of each rank's own. With per-domain
    passes that is still one domain's batch only if every rank runs the same domain's pass at the same moment:
    the pair's forward always runs source, then target, and the pooled mix draws the same domain order on every
    rank (``pooled_batches``' shared ``order_seed``), so it holds here; were one rank's pass a target batch while
    another's was a source batch, SyncBN would pool their statistics -- exactly the cross-domain mixing the
    separate passes exist to prevent (docs/method.md) -- and a rank without a batch for a domain would leave the
    others waiting in SyncBN's all-gather. What it buys: statistics over ``world x batch_size`` segments per
    domain rather than ``batch_size``, i.e. the single-GPU statistics at a smaller per-GPU batch; what it costs:
    two all-gathers per BN layer and pass. PyTorch's SyncBatchNorm runs on GPUs only: on CPU workers the switch
    is ignored with a warning (the model keeps per-rank BatchNorm).
    """
    from ray.train.torch import prepare_model

    if sync_batchnorm and ray.train.get_context().get_world_size() > 1:
        if next(pair.parameters()).device.type == "cuda":
            pair = torch.nn.SyncBatchNorm.convert_sync_batchnorm(pair)
        else:
            logger.warning("sync_batchnorm needs CUDA (torch's SyncBatchNorm is GPU-only): per-rank BatchNorm")
    return prepare_model(pair, move_to_device=False, parallel_strategy_kwargs={"broadcast_buffers": False})


def student_loop(config: dict) -> None:
    """Ray Train worker loop: the shared ``fit`` in mode "distill"."""
    from mdlda.training import fit

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    trial = TrialConfig.model_validate(config["trial"])
    train_cfg = trial.train
    if config.get("use_gpu"):
        train_cfg = train_cfg.model_copy(update={"device": str(ray.train.torch.get_device())})
    seed_everything(train_cfg.seed)
    model = build_model(trial.model, trial.model_overrides, config["frontend_stats"])
    if config.get("init_state") is not None:  # student.init = teacher (a resumed run's checkpoint overrides it)
        model.load_state_dict(config["init_state"])
    source = ray.train.get_dataset_shard("source")
    target = ray.train.get_dataset_shard("target")
    valid = ray.train.get_dataset_shard("valid")

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_training_state(d)

    start_epoch = int(state["next_epoch"]) if state and "next_epoch" in state else 0

    def on_epoch(res) -> None:
        spread = replica_spread(model)  # DDP + the averaged BN statistics keep every rank's state identical
        if spread > 0:
            raise RuntimeError(f"epoch {res.epoch}: the data-parallel replicas diverged (max difference {spread:g})")
        metrics = {
            **res.metrics(),
            "best_valid_r_mean": res.best_score,
            "world_size": ctx.get_world_size(),
            "start_epoch": start_epoch,  # > 0 after a restart from a checkpoint
            "replica_spread": spread,
        }
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_training_state(res.state(), d)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)  # a barrier: every rank reports every epoch

    world = ctx.get_world_size()
    sizes = (config["sizes"][0] // world, config["sizes"][1] // world)  # this rank's share of each set

    def batches(epoch: int):
        weighting, labels = config.get("weighting", "uniform"), config.get("labels", "calibrated")
        return (spread_weighted(pseudo_labels(b, labels), weighting) for b in mixed(epoch))

    sampling = Sampling(train_cfg.batch_size, train_cfg.seed + 1000 * rank, train_cfg.shuffle_buffer)

    def mixed(epoch: int):
        if config.get("mix", "pooled") == "pooled":
            return pooled_batches(source, target, sampling, epoch, sizes, order_seed=train_cfg.seed)
        return train_batches(source, sampling, epoch, target, target_labelled=True)

    result = fit(
        model,
        batches,
        lambda: valid_batches(valid, train_cfg.valid_batch_size),
        train_cfg,
        on_epoch=on_epoch,
        state=state,
        wrap=functools.partial(data_parallel, sync_batchnorm=config.get("sync_batchnorm", False)),
    )
    if result.status == "nan":
        raise RuntimeError(f"student training diverged: {result.message}")


class EpochEvents(ray.train.UserCallback):
    """Runs in Ray Train's controller (an actor): hands rank 0's metrics of every epoch to the driver's queue."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics:
            self.queue.put(dict(metrics[0]))


class EpochLines:
    """Driver side: one ``mdlda.student`` event per epoch the workers report (console and mdlda.log)."""

    def __init__(self, name: str, max_epochs: int) -> None:
        self.name, self.max_epochs = name, max_epochs
        self.start = time.monotonic()
        self.first: int | None = None

    def __call__(self, m: dict) -> None:
        epoch = int(m.get("epoch", 0)) + 1
        self.first = epoch if self.first is None else self.first
        elapsed = time.monotonic() - self.start
        eta = ""
        if self.max_epochs > epoch:  # patience may stop it sooner
            eta = f" | ETA ~{_fmt_s(elapsed / (epoch - self.first + 1) * (self.max_epochs - epoch))} (at most)"
        logger.info(
            "%s: epoch %d/%d: train loss %.4f, valid r %.3f (best %.3f), %.1f samples/s, data wait %.0f%%%s",
            self.name,
            epoch,
            self.max_epochs,
            float(m.get("train_loss", float("nan"))),
            float(m.get("valid_r_mean", float("nan"))),
            float(m.get("best_valid_r_mean", float("nan"))),
            float(m.get("samples_per_s", float("nan"))),
            100 * float(m.get("data_wait_fraction", float("nan"))),
            eta,
            extra={"show": True},
        )


def _fmt_s(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def student_trial_config(cfg: StudentConfig) -> TrialConfig:
    """The student's run in the shape of a sweep trial's config (mode distill)."""
    train = {**cfg.train.model_dump(mode="json", exclude_unset=True), "mode": "distill"}
    return TrialConfig.model_validate({"model": cfg.model, "model_overrides": cfg.model_overrides, "train": train})


def initial_weights(cfg: StudentConfig, teacher_uris: list[str], frontend_stats) -> dict | None:
    """The student's starting weights: None (scratch), or the first (best-ranked) teacher's state dict, checked
    against the student's own architecture so a mismatch fails here with both model descriptions."""
    if cfg.init == "scratch":
        return None
    if not teacher_uris:
        raise ValueError("student.init = teacher, but the pseudo-labels name no teacher")
    from mdlda.served import load_checkpoint

    teacher = load_checkpoint(teacher_uris[0])
    mine = build_model(cfg.model, cfg.model_overrides, frontend_stats)
    state = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    ours = mine.state_dict()
    shared = set(state) & set(ours)
    wrong = sorted(set(state) ^ set(ours)) + sorted(k for k in shared if state[k].shape != ours[k].shape)
    if wrong:
        raise ValueError(
            f"student.init = teacher: teacher {teacher_uris[0]} does not have the student's architecture "
            f"(model {cfg.model!r}, overrides {cfg.model_overrides}); differing weights: {', '.join(wrong[:5])}"
            + (" ..." if len(wrong) > 5 else "")
        )
    return state


def train_student(
    cfg: StudentConfig,
    data: StageData,
    frontend_stats,
    storage: str | Path,
    name: str,
    init_state: dict | None = None,
) -> StudentResult:
    """Fit (or resume) the student run ``name`` under ``storage``; ``init_state``: its starting weights."""
    storage = str(Path(storage).resolve()) if "://" not in str(storage) else str(storage)
    if data.target is None:
        raise ValueError("the student needs the pseudo-labelled target set")
    trial = student_trial_config(cfg)
    max_epochs = trial.train.max_epochs
    progress = ExitStack()  # one line per epoch, handed over by the controller (EpochEvents)
    queue = progress.enter_context(watched_queue(EpochLines("student", max_epochs)))
    trainer = TorchTrainer(
        student_loop,
        train_loop_config={
            "trial": trial.model_dump(mode="json"),
            "frontend_stats": frontend_stats,
            "use_gpu": cfg.use_gpu,
            "mix": cfg.mix,
            "weighting": cfg.weighting,
            "labels": cfg.labels,
            "init_state": init_state,
            "sync_batchnorm": cfg.sync_batchnorm,
            "sizes": (data.counts["source_train"], data.counts["target"]),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        datasets={"source": data.source_train, "target": data.target, "valid": data.source_valid},
        # one worker reads whole datasets: no streaming-split coordinator between it and the data
        dataset_config=DataConfig(
            datasets_to_split=["source", "target"] if cfg.num_workers > 1 else [],
            # resolved here: left unset, Ray Train resolves them in its DatasetManager actor, whose default
            # context does not preserve order, so a run's batch order (and its student) depended on timing
            execution_options=DataConfig.default_ingest_options(),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[EpochEvents(queue)],
        ),
    )
    with progress:
        result = trainer.fit()
    if result.error is not None or result.checkpoint is None:
        raise RuntimeError(f"student run {name} failed: {result.error}")
    # Ray Train's metrics_dataframe holds only the reports whose checkpoints are kept (num_to_keep): the history
    # of every epoch is in the last checkpoint's training state
    import pandas as pd

    history = pd.DataFrame(load_training_state(result.checkpoint.path)["history"])
    best = float(history["valid_r_mean"].max()) if "valid_r_mean" in history else float("nan")
    return StudentResult(result, f"{storage}/{name}", best, result.checkpoint.path, history)
