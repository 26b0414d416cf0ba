"""One concise progress line per interval for a Ray Tune sweep, and warnings users act on.

``trials 3/8 done, 2 running, 1 failed | best valid_r_mean 0.412 (abc12_00003) | ETA 4m10s``; a trial whose
epochs spend more than 30% of their time waiting for batches is named once (the input pipeline, not the model, is
the bottleneck there).
"""

from __future__ import annotations

import logging
import math
import time

from ray.tune import Callback

logger = logging.getLogger("mdlda.sweep")
DATA_WAIT_WARN = 0.3


def echo_and_log(line: str) -> None:
    """Print a progress line and keep it in the workdir log (a module function: Tune pickles the callback)."""
    print(line, flush=True)
    logger.info(line)


class SweepProgress(Callback):
    def __init__(self, total: int, metric: str = "valid_r_mean", interval_s: float = 30.0, echo=echo_and_log) -> None:
        self.total, self.metric, self.interval_s, self.echo = total, metric, interval_s, echo
        self.start = time.monotonic()
        self.last = 0.0
        self.best = (-math.inf, None)
        self.warned: set[str] = set()
        self.epoch_seconds: list[float] = []
        self.max_epochs: int | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        score = result.get(self.metric)
        if score is not None and math.isfinite(score) and score > self.best[0]:
            self.best = (score, trial.trial_id)
        if "seconds" in result:
            self.epoch_seconds.append(float(result["seconds"]))
        wait = result.get("data_wait_fraction")
        if wait is not None and wait > DATA_WAIT_WARN and trial.trial_id not in self.warned:
            self.warned.add(trial.trial_id)
            self.echo(
                f"warning: trial {trial.trial_id} waited for data {wait:.0%} of an epoch (> {DATA_WAIT_WARN:.0%}): "
                "the input pipeline limits training; materialize the data (more object store memory, "
                "materialize_share) or add CPUs per trial"
            )

    def on_step_end(self, iteration, trials, **info) -> None:
        now = time.monotonic()
        if now - self.last < self.interval_s:
            return
        self.last = now
        self.echo(self.line(trials))

    def on_experiment_end(self, trials, **info) -> None:
        self.echo(self.line(trials))

    def line(self, trials) -> str:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        failed = sum(t.status == "ERROR" for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        best = f"{self.best[0]:.3f} ({self.best[1]})" if self.best[1] else "-"
        elapsed = time.monotonic() - self.start
        eta = "-"
        if 0 < done < self.total:
            eta = _fmt(elapsed / done * (self.total - done))
        return (
            f"trials {done}/{self.total} done, {running} running, {failed} failed | best {self.metric} {best} | "
            f"elapsed {_fmt(elapsed)} | ETA {eta}"
        )


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
