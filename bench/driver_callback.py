"""The Tune driver's cost per trial result: Ray's MLflowLoggerCallback vs mdlda's BatchedMLflowLoggerCallback.

    python bench/driver_callback.py [--trials 6 --epochs 20 --rounds 3]

Both callbacks log the same results (one per epoch and trial, with the metric keys a teacher trial reports) to
their own SQLite MLflow store in a temporary folder, interleaved round by round (stock, batched, stock, ...), so
the machine's load hits both. Prints the driver's milliseconds per result (mean and 95th percentile) and their
ratio, then checks that both stores hold the same metric histories (same keys, steps and values).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def results(trials: int, epochs: int, seed: int = 0) -> list[list[dict]]:
    """Per trial, one result dict per epoch with the keys of mdlda's fit() metrics plus Tune's own."""
    from mdlda.params import FEATURES

    rng = np.random.default_rng(seed)
    out = []
    for t in range(trials):
        rows = []
        for e in range(epochs):
            r = {"epoch": e, "train_loss": rng.random(), "train_mse": rng.random(), "valid_loss": rng.random()}
            r |= {f"valid_r_{f}": rng.random() for f in FEATURES} | {"valid_r_mean": rng.random()}
            r |= {f"valid_rmse_{f}": rng.random() for f in FEATURES} | {"valid_rmse_mean": rng.random()}
            r |= {"train_domain_loss": rng.random(), "domain_acc": rng.random(), "adv_lambda": rng.random()}
            r |= {"lr": 2e-3, "seconds": 15.0, "samples_per_s": 10.0, "data_wait_fraction": 0.02, "is_best": 1.0}
            r |= {"best_score": rng.random(), "trained_out": 0.0, "best_valid_r_mean": rng.random()}
            r |= {"training_iteration": e + 1, "trial_id": f"t{t}", "time_this_iter_s": 15.0, "done": False}
            r |= {"config": {"lr": 2e-3, "adv_scale": 0.1, "seed": t}}
            rows.append(r)
        out.append(rows)
    return out


def run(kind: str, store: Path, data: list[list[dict]]) -> list[float]:
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.experiment import Trial

    from pipelines.mlflow_callback import BatchedMLflowLoggerCallback

    cls = BatchedMLflowLoggerCallback if kind == "batched" else MLflowLoggerCallback
    cb = cls(tracking_uri=f"sqlite:///{store}", experiment_name="bench", tags={"sweep": "bench"}, save_artifact=False)
    cb.setup()
    trials = [
        Trial("bench_trainable", config=rows[0]["config"], trial_id=f"t{i}", stub=True) for i, rows in enumerate(data)
    ]
    for t in trials:
        cb.log_trial_start(t)
    times = []
    for e in range(len(data[0])):  # the order a sweep reports in: every running trial's epoch e
        for t, rows in zip(trials, data, strict=True):
            t0 = time.perf_counter()
            cb.log_trial_result(e + 1, t, rows[e])
            times.append(time.perf_counter() - t0)
    for t in trials:
        cb.log_trial_end(t)
    return times


def histories(store: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    exp = client.get_experiment_by_name("bench")
    out = {}
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        name = run.data.tags["mlflow.runName"]
        for key in run.data.metrics:
            out[(name, key)] = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    data = results(args.trials, args.epochs)
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    times = {"stock": [], "batched": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for kind in ("stock", "batched"):
                times[kind] += run(kind, Path(tmp) / f"{kind}-{r}.db", data)
        same = histories(Path(tmp) / "stock-0.db") == histories(Path(tmp) / "batched-0.db")
        n_keys = len(histories(Path(tmp) / "batched-0.db"))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    n = len(times["stock"])
    print(f"\n{n} results per callback ({args.trials} trials x {args.epochs} epochs x {args.rounds} rounds)\n")
    print("| callback | ms per result (mean) | ms per result (p95) |\n|---|---:|---:|")
    for kind, t in times.items():
        print(f"| {kind} | {1000 * np.mean(t):.1f} | {1000 * np.percentile(t, 95):.1f} |")
    print(f"\nbatched / stock driver time: {np.mean(times['batched']) / np.mean(times['stock']):.3f}x")
    print(f"same metric histories in both stores ({n_keys} trial x metric series): {same}")
    if not same:
        raise SystemExit("the batched callback's store differs from the stock one's")


if __name__ == "__main__":
    main()
