"""The Tune driver's batched MLflow logger writes exactly what Ray's stock logger writes (real SQLite stores)."""

from __future__ import annotations

import math

import pytest


def _results(n_epochs: int) -> list[dict]:
    return [
        {
            "training_iteration": e + 1,
            "epoch": e,
            "valid_r_mean": 0.1 * e,
            "valid_loss": 1.0 / (e + 1),
            "lr": 2e-3,
            "is_best": float(e % 2),
            "trial_id": "skipped: not a number",
            "nested": {"value": e * 3.0},  # flattened to nested/value as Ray does
            "done": False,
        }
        for e in range(n_epochs)
    ]


def _log(cls, store, trials: int, epochs: int) -> dict:
    from mlflow.tracking import MlflowClient
    from ray.tune.experiment import Trial

    cb = cls(tracking_uri=f"sqlite:///{store}", experiment_name="cb", tags={"sweep": "s"}, save_artifact=False)
    cb.setup()
    runs = [Trial("trainable", config={"lr": 2e-3, "seed": i}, trial_id=f"t{i}", stub=True) for i in range(trials)]
    for t in runs:
        cb.log_trial_start(t)
    for e, result in enumerate(_results(epochs)):
        for t in runs:
            cb.log_trial_result(e + 1, t, result)
    for t in runs:
        cb.log_trial_end(t)
    client = MlflowClient(f"sqlite:///{store}")
    exp = client.get_experiment_by_name("cb")
    out = {}
    for run in client.search_runs([exp.experiment_id]):
        name = run.data.tags["mlflow.runName"]
        out[(name, "params")] = run.data.params
        out[(name, "status")] = run.info.status
        for key in run.data.metrics:
            out[(name, key)] = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
    return out


def test_batched_logger_records_every_metric_at_every_step_like_rays_own(tmp_path, monkeypatch, seed_store):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from pipelines.mlflow_callback import BatchedMLflowLoggerCallback

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stock = _log(MLflowLoggerCallback, seed_store(tmp_path / "stock.db"), trials=2, epochs=4)
    batched = _log(BatchedMLflowLoggerCallback, seed_store(tmp_path / "batched.db"), trials=2, epochs=4)
    assert batched == stock
    history = batched[("trainable_t1", "valid_r_mean")]
    assert [s for s, _ in history] == [1, 2, 3, 4] and history[-1][1] == pytest.approx(0.3)
    assert batched[("trainable_t0", "nested/value")][-1] == (4, 9.0)
    assert ("trainable_t0", "trial_id") not in batched and batched[("trainable_t0", "status")] == "FINISHED"
    assert all(math.isfinite(v) for key, h in batched.items() if key[1] not in ("params", "status") for _, v in h)
