"""The Ray Tune function trainable shared by the teacher and baseline sweeps.

A trial's config has the shape of :class:`mdlda.config.TrialConfig` (``pipelines/teachers.py`` param_space
builds it): ``model`` and ``model_overrides`` go to ``create_model``, ``train`` (a TrainConfig, batch sizes
included) to the training loop and the batch iterators. The trial reports every epoch with a checkpoint (the full
resumable training state) and raises when the loss diverges, so Tune marks it failed and the sweep goes on.
"""

from __future__ import annotations

import tempfile
from typing import Any

from ray import tune

from mdlda.adapt import DomainHead
from mdlda.checkpoints import load_training_state, save_training_state, seed_everything
from mdlda.config import TrialConfig
from mdlda.models import create_model
from mdlda.training import fit
from pipelines.batches import Sampling, train_batches, valid_batches
from pipelines.data import StageData


class TrialDiverged(RuntimeError):
    """The training loss became NaN/inf: the trial is failed and never selected."""


def build_model(model_name: str, overrides: dict, frontend_stats: tuple[list[float], list[float]] | None):
    model = create_model(model_name, **overrides)
    if frontend_stats is not None:
        model.frontend.set_standardization(*frontend_stats)
    return model


def train_trial(config: dict[str, Any], data: StageData, frontend_stats: tuple[list[float], list[float]]) -> None:
    """Tune function trainable: one teacher (mode "dann") or baseline (mode "supervised")."""
    trial = TrialConfig.model_validate(config)
    train_cfg = trial.train
    seed_everything(train_cfg.seed)
    model = build_model(trial.model, trial.model_overrides, frontend_stats)
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

    sampling = Sampling(train_cfg.batch_size, train_cfg.seed, train_cfg.shuffle_buffer)
    result = fit(
        model,
        lambda epoch: train_batches(data.source_train, sampling, epoch, target),
        lambda: valid_batches(data.source_valid, train_cfg.valid_batch_size),
        train_cfg,
        domain_head=head,
        on_epoch=on_epoch,
        state=state,
    )
    if result.status == "nan":
        raise TrialDiverged(result.message)
