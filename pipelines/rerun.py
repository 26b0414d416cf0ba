"""`mdlda teachers --rerun TRIAL_ID`: one trial of a stored sweep trained again from its recorded config, its
per-epoch validation scores compared with the logged ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from mdlda.config import SweepConfig
from pipelines.data import StageData
from pipelines.trial import train_trial

# Reruns on the same kind of machine repeat a trial's per-epoch validation scores within this tolerance: on CPU the
# data order, initialisation and augmentation are seeded and one thread per trial keeps the arithmetic in the same
# order; GPUs (cuDNN autotuning, atomics) and a different thread count can move scores by more.
RERUN_TOLERANCE = 1e-3


@dataclass
class RerunResult:
    trial_id: str
    config: dict
    comparison: Any  # pandas DataFrame: epoch, logged, rerun, abs_diff
    max_abs_diff: float
    path: str

    @property
    def matches(self) -> bool:
        return self.max_abs_diff <= RERUN_TOLERANCE


def recorded_trial(path: str | Path, trial_id: str):
    """(config, per-epoch metrics) of one trial of the sweep stored at ``path``."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(str(path))
    except Exception as exc:
        raise FileNotFoundError(f"{path}: no sweep stored there ({exc})") from exc
    for trial in analysis.trials:
        if trial.trial_id == trial_id or str(trial).endswith(trial_id):
            frame = analysis.trial_dataframes.get(trial.trial_id)
            if frame is None or frame.empty:
                raise ValueError(f"trial {trial_id} of {path} reported no epochs: nothing to compare a rerun with")
            return dict(trial.config), frame
    known = ", ".join(sorted(t.trial_id for t in analysis.trials))
    raise KeyError(f"no trial {trial_id!r} in {path} (trials: {known})")


def rerun_trial(
    sweep: SweepConfig,
    trial_id: str,
    data: StageData,
    frontend_stats,
    storage: str | Path,
    callbacks: list | None = None,
) -> RerunResult:
    """Train one trial of the sweep ``sweep.name`` stored under ``storage`` again from its recorded config, for as
    many epochs as it reported, and compare its per-epoch ``sweep.metric`` with the logged one."""
    import time

    import numpy as np
    import pandas as pd

    metric = sweep.metric
    config, logged = recorded_trial(Path(storage) / sweep.name, trial_id)
    epochs = int(len(logged))
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, data=data, frontend_stats=frontend_stats),
        {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial},
    )
    name = f"rerun-{trial_id}-{time.strftime('%Y%m%d-%H%M%S')}"
    tuner = tune.Tuner(
        trainable,
        param_space=config,
        tune_config=tune.TuneConfig(num_samples=1),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(Path(storage).resolve()) if "://" not in str(storage) else str(storage),
            stop={"training_iteration": epochs},  # ASHA may have stopped the original early
            callbacks=callbacks or [],
            verbose=0,
        ),
    )
    result = tuner.fit()[0]
    if result.error is not None:
        raise RuntimeError(f"the rerun of {trial_id} failed: {result.error}")
    again = result.metrics_dataframe
    n = min(len(again), epochs)
    comparison = pd.DataFrame(
        {
            "epoch": logged["epoch"].to_numpy()[:n] if "epoch" in logged else np.arange(n),
            "logged": logged[metric].to_numpy(dtype=float)[:n],
            "rerun": again[metric].to_numpy(dtype=float)[:n],
        }
    )
    comparison["abs_diff"] = (comparison.logged - comparison.rerun).abs()
    worst = float(comparison.abs_diff.max()) if n == epochs else float("inf")
    return RerunResult(trial_id, config, comparison, worst, result.path)
