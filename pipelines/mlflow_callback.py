"""The Tune driver's MLflow logger, one write per trial result.

Ray's ``MLflowLoggerCallback`` logs a result's metrics one ``log_metric`` call at a time, after a ``get_run``
check: with ~40 metrics a result that is ~40 SQLite transactions in the Tune driver's event loop (Tune warned
"`callbacks.on_trial_result` took 0.6 s" on a held-out run), and every trial's next result waits behind them.
``BatchedMLflowLoggerCallback`` keeps Ray's runs, tags, params and run names and writes each result's metrics
in one ``log_batch`` call (one transaction): the same metrics at the same steps, nothing buffered across
results, so a driver killed between two results loses nothing that was reported before it. ``params`` maps a
trial's config to the params its run logs (the sweeps log their nested trial configs flat: ``lr``, ``width``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.result import TIMESTEPS_TOTAL, TRAINING_ITERATION
from ray.tune.utils import flatten_dict

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch request


class BatchedMLflowLoggerCallback(MLflowLoggerCallback):
    """``MLflowLoggerCallback`` whose ``log_trial_result`` is one ``MlflowClient.log_batch`` per result."""

    _client = None

    def __init__(self, *args, params: Callable[[dict], dict[str, Any]] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._params = params

    def log_trial_start(self, trial) -> None:
        if self._params is None:
            return super().log_trial_start(trial)
        if trial not in self._trial_runs:  # Ray's run, tags and name
            tags = {**(self.tags or {}), "trial_name": str(trial)}
            run = self.mlflow_util.start_run(tags=tags, run_name=str(trial))
            self._trial_runs[trial] = run.info.run_id
        if not self.log_params_on_trial_end:
            self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=self._params(trial.config))

    def _mlflow_client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            mlflow = self.mlflow_util._mlflow
            self._client = MlflowClient(tracking_uri=mlflow.get_tracking_uri(), registry_uri=mlflow.get_registry_uri())
        return self._client

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        from mlflow.entities import Metric

        step = result.get(TIMESTEPS_TOTAL) or result[TRAINING_ITERATION]
        run_id = self._trial_runs[trial]
        values = self.mlflow_util._parse_dict(flatten_dict(result))  # Ray's own float conversion and skips
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        client = self._mlflow_client()
        for i in range(0, len(metrics), MAX_BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + MAX_BATCH])
