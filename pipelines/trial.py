"""The Ray Tune function trainable shared by the teacher and baseline sweeps.

A trial's config is flat: TrainConfig fields go to the training loop, ``batch_size`` / ``shuffle_buffer`` to
the batch iterators, everything else (``width``, ``rho``, ...) to ``create_model``. The trial reports every
epoch with a checkpoint (the full resumable training state) and raises when the loss diverges, so Tune marks
it failed and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Any

import torch
from ray import tune

from mdlda.adapt import DomainHead
from mdlda.checkpoints import load_training_state, save_training_state, seed_everything
from mdlda.models import create_model
from mdlda.training import TrainConfig, fit
from pipelines.data import StageData, train_batches, valid_batches

TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
BATCH_KEYS = {"batch_size", "shuffle_buffer", "valid_batch_size"}
META_KEYS = {"model", "threads"}


class TrialDiverged(RuntimeError):
    """The training loss became NaN/inf: the trial is failed and never selected."""


def split_trial_config(config: dict[str, Any]) -> tuple[str, dict, TrainConfig, dict]:
    """(model name, model overrides, TrainConfig, batch settings) from a flat trial config."""
    model_name = config.get("model", "rfresnet")
    train = {k: v for k, v in config.items() if k in TRAIN_KEYS}
    batch = {"batch_size": 8, "shuffle_buffer": 64, "valid_batch_size": 16}
    batch.update({k: v for k, v in config.items() if k in BATCH_KEYS})
    overrides = {k: v for k, v in config.items() if k not in TRAIN_KEYS | BATCH_KEYS | META_KEYS}
    if "lr_milestones" in train:
        train["lr_milestones"] = tuple(train["lr_milestones"])
    return model_name, overrides, TrainConfig.from_dict(train), batch


def build_model(model_name: str, overrides: dict, frontend_stats: tuple[list[float], list[float]] | None):
    model = create_model(model_name, **overrides)
    if frontend_stats is not None:
        model.frontend.set_standardization(*frontend_stats)
    return model


def train_trial(config: dict[str, Any], data: StageData, frontend_stats: tuple[list[float], list[float]]) -> None:
    """Tune function trainable: one teacher (mode "dann") or baseline (mode "supervised")."""
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    model_name, overrides, train_cfg, batch = split_trial_config(config)
    seed_everything(train_cfg.seed)
    model = build_model(model_name, overrides, frontend_stats)
    head = DomainHead(model.embed_dim) if train_cfg.mode == "dann" else None
    target = data.target if train_cfg.mode == "dann" else None

    state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # Tune restored this trial: continue exactly where it stopped
        with checkpoint.as_directory() as d:
            state = load_training_state(d)

    def on_epoch(res) -> None:
        metrics = res.metrics()
        metrics["best_valid_r_mean"] = res.best_score
        with tempfile.TemporaryDirectory() as d:
            save_training_state(res.state(), d)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    result = fit(
        model,
        lambda epoch: train_batches(
            data.source_train,
            batch["batch_size"],
            train_cfg.seed,
            epoch,
            target,
            shuffle_buffer=batch["shuffle_buffer"],
        ),
        lambda: valid_batches(data.source_valid, batch["valid_batch_size"]),
        train_cfg,
        domain_head=head,
        on_epoch=on_epoch,
        state=state,
    )
    if result.status == "nan":
        raise TrialDiverged(result.message)
