"""A Ray Tune sweep's progress as events on the ``mdlda.sweep`` logger, and the warnings users act on.

Every event (a trial started, reported an epoch, ended or failed) is one INFO record whose message is a complete
line, ``teachers-1a2b: trial 00003 epoch 4: valid r 0.412 (best 0.415), 38.2 samples/s, data wait 12% | 3/8
done, 2 running | ETA ~4m10s``, and whose ``view`` holds every trial's row for a live table
(:class:`mdlda.console.ConsoleHandler` shows one or the other). A trial that fails or is lost, and a trial whose
epochs spend more than 30% of their time waiting for batches (the input pipeline, not the model, is the
bottleneck there), are a warning once, with what to do.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager

from ray.tune import Callback

logger = logging.getLogger("mdlda.sweep")
DATA_WAIT_WARN = 0.3
REFRESH_S = 2.0  # live table refreshes between events (DEBUG records: no line in a log file)


class SweepProgress(Callback):
    """Picklable (Tune stores its callbacks with the sweep): plain data, and the module's logger."""

    def __init__(self, total: int, metric: str = "valid_r_mean", name: str = "sweep", max_epochs: int | None = None):
        self.total, self.metric, self.name, self.max_epochs = total, metric, name, max_epochs
        self.start = time.monotonic()
        self.last = 0.0
        self.rows: dict[str, dict] = {}
        self.best = (-math.inf, None)
        self.warned: set[str] = set()
        self.epochs_done = 0

    def __setstate__(self, state: dict) -> None:
        """A sweep stored by an older mdlda resumes with this callback: missing fields take their defaults."""
        self.__init__(state.get("total", 0), state.get("metric", "valid_r_mean"))
        self.__dict__.update({k: v for k, v in state.items() if k in self.__dict__})

    # ------------------------------------------------------------------------------------------- Tune hooks
    def setup(self, **info) -> None:
        self.start = time.monotonic()  # a restored sweep counts from now

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        row = self._row(trial)
        row["state"] = "running"
        self._event(f"trial {row['trial']} started")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        row = self._row(trial)
        score = _finite(result.get(self.metric))
        row.update(
            state="running",
            epoch=int(result.get("training_iteration", row.get("epoch") or 0)),
            last=score,
            samples_per_s=_finite(result.get("samples_per_s")),
            data_wait=_finite(result.get("data_wait_fraction")),
        )
        if score is not None and (row.get("best") is None or score > row["best"]):
            row["best"] = score
        if score is not None and score > self.best[0]:
            self.best = (score, row["trial"])
        self.epochs_done += 1
        self._event(
            f"trial {row['trial']} epoch {row['epoch']}: {_short(self.metric)} {_fmt_num(score)} "
            f"(best {_fmt_num(row.get('best'))}), {_fmt_num(row['samples_per_s'], '{:.1f}')} samples/s, "
            f"data wait {_fmt_num(row['data_wait'], '{:.0%}')}"
        )
        wait = row["data_wait"]
        if wait is not None and wait > DATA_WAIT_WARN and trial.trial_id not in self.warned:
            self.warned.add(trial.trial_id)
            logger.warning(
                "trial %s waited for data %.0f%% of an epoch (more than %.0f%%): the input pipeline limits training; "
                "materialize the data (more object store memory, materialize_share) "
                "or give trials more CPUs (cpus_per_trial)",
                row["trial"],
                100 * wait,
                100 * DATA_WAIT_WARN,
            )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        row = self._row(trial)
        epochs = row.get("epoch") or 0
        early = self.max_epochs is not None and epochs < self.max_epochs
        row["state"] = "stopped" if early else "finished"
        if early:
            self.epochs_done += self.max_epochs - epochs  # the epochs it will not run are done for the ETA
        how = "stopped early" if early else "finished"
        self._event(f"trial {row['trial']} {how} after {epochs} epoch(s): best {_fmt_num(row.get('best'))}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        from pipelines.select import _last_line, is_lost

        row = self._row(trial)
        error = _trial_error(trial)
        lost = is_lost(error)
        row["state"] = "lost" if lost else "failed"
        if self.max_epochs is not None:
            self.epochs_done += max(0, self.max_epochs - (row.get("epoch") or 0))
        self._event(f"trial {row['trial']} {row['state']} after {row.get('epoch') or 0} epoch(s)")
        if lost:
            logger.warning(
                "trial %s was lost (its worker or node went away): it is not selected; rerunning the same command "
                "resumes the sweep",
                row["trial"],
            )
        else:
            where = f"{trial.path}/error.txt" if getattr(trial, "path", None) else "its trial folder"
            reason = _last_line(error) or "no message"
            logger.warning("trial %s failed (%s): it is not selected; traceback in %s", row["trial"], reason, where)

    def on_step_end(self, iteration, trials, **info) -> None:
        now = time.monotonic()
        if now - self.last >= REFRESH_S:
            self.last = now
            logger.debug("%s", self.totals(), extra={"view": self.view()})

    def on_experiment_end(self, trials, **info) -> None:
        for t in trials:  # trials that never started in this process (a resumed sweep) are rows too
            self._row(t)
        done = sum(r["state"] in ("finished", "stopped") for r in self.rows.values())
        bad = sum(r["state"] in ("failed", "lost") for r in self.rows.values())
        best = f"{self.best[0]:.3f} (trial {self.best[1]})" if self.best[1] else "-"
        logger.info(
            "%s: sweep done in %s: %d trial(s) finished, %d failed or lost; best %s %s",
            self.name,
            _fmt_s(time.monotonic() - self.start),
            done,
            bad,
            _short(self.metric),
            best,
            extra={"view": {**self.view(), "final": True}},
        )

    # ------------------------------------------------------------------------------------------- helpers
    def _row(self, trial) -> dict:
        key = trial.trial_id
        if key not in self.rows:
            state = {"TERMINATED": "finished", "ERROR": "failed", "RUNNING": "running"}.get(trial.status, "pending")
            self.rows[key] = {"trial": _short_id(key), "state": state, "epoch": None, "last": None, "best": None}
        return self.rows[key]

    def _event(self, line: str) -> None:
        logger.info("%s: %s | %s", self.name, line, self.totals(), extra={"view": self.view()})

    def view(self) -> dict:
        return {"kind": "sweep", "name": self.name, "rows": list(self.rows.values()), "totals": self.totals()}

    def totals(self) -> str:
        rows = self.rows.values()
        done = sum(r["state"] in ("finished", "stopped", "failed", "lost") for r in rows)
        running = sum(r["state"] == "running" for r in rows)
        failed = sum(r["state"] in ("failed", "lost") for r in rows)
        elapsed = time.monotonic() - self.start
        text = f"{done}/{self.total} done, {running} running" + (f", {failed} failed" if failed else "")
        text += f" | elapsed {_fmt_s(elapsed)}"
        planned = self.total * self.max_epochs if self.max_epochs else None
        if planned and 0 < self.epochs_done < planned:
            text += f" | ETA ~{_fmt_s(elapsed / self.epochs_done * (planned - self.epochs_done))}"
        return text


def _trial_error(trial):
    """The trial's exception as Tune stored it (its text when only the error file can be read)."""
    try:
        error = trial.get_pickled_error()
        if error is not None:
            return error
    except Exception:  # an exception class that does not unpickle here
        pass
    try:
        with open(trial.error_file) as f:
            return RuntimeError(f.read())
    except (OSError, TypeError):
        return RuntimeError("")


def _finite(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _fmt_num(value, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def _short(metric: str) -> str:
    return metric.replace("valid_r_mean", "valid r").replace("_", " ")


def _short_id(trial_id: str) -> str:
    """``e154a_00003`` -> ``00003`` (the sweep's prefix is the same for every trial)."""
    return trial_id.rsplit("_", 1)[-1]


def _fmt_s(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


@contextmanager
def watched_queue(on_item):
    """A Ray queue that workers and actors put progress into (student epochs, labelled batches), and a driver
    thread that calls ``on_item`` for each item; the queue is drained and shut down when the block ends."""
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})  # 0 CPUs: it never competes with the workers or Ray Data
    stop = threading.Event()

    def watch() -> None:
        while True:
            try:
                item = queue.get(timeout=0.5)
            except Empty:
                if stop.is_set():
                    return
                continue
            except Exception:  # the queue's actor is gone (shutdown, a lost node): nothing more to show
                return
            try:
                on_item(item)
            except Exception:
                logger.exception("showing progress failed")

    thread = threading.Thread(target=watch, name="mdlda-progress", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        stop.set()
        thread.join(timeout=10)
        queue.shutdown()
