"""A sweep's progress lines from Tune's callback hooks, on fake trials (no Ray started)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from pipelines import progress
from pipelines.progress import SweepProgress


class ActorDiedError(Exception):
    """Named like Ray's: the trial's worker went away."""


def _trial(trial_id: str, error: Exception | None = None):
    return SimpleNamespace(
        trial_id=trial_id, status="RUNNING", path=f"/sweep/{trial_id}", get_pickled_error=lambda: error, error_file=None
    )


@pytest.fixture()
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    return now


def _lines(caplog, level=logging.INFO) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "mdlda.sweep" and r.levelno == level]
    caplog.clear()
    return lines


def test_each_event_is_one_complete_line_with_totals_and_eta(clock, caplog):
    caplog.set_level(logging.DEBUG, logger="mdlda.sweep")
    p = SweepProgress(total=2, name="teachers-1a2b", max_epochs=4)
    a, b = _trial("e154a_00003"), _trial("e154a_00004")
    p.on_trial_start(0, [], a)
    assert _lines(caplog) == ["teachers-1a2b: trial 00003 started | 0/2 done, 1 running | elapsed 0s"]
    clock[0] = 10.0
    result = {"valid_r_mean": 0.412, "training_iteration": 1, "samples_per_s": 38.2, "data_wait_fraction": 0.12}
    p.on_trial_result(0, [], a, result)
    # 1 of 2 x 4 planned epochs took 10 s: 7 more take ~70 s
    assert _lines(caplog) == [
        "teachers-1a2b: trial 00003 epoch 1: valid r 0.412 (best 0.412), 38.2 samples/s, data wait 12% "
        "| 0/2 done, 1 running | elapsed 10s | ETA ~1m10s"
    ]
    p.on_trial_result(0, [], a, {**result, "valid_r_mean": 0.3, "training_iteration": 2, "samples_per_s": "nan"})
    assert _lines(caplog)[0].startswith("teachers-1a2b: trial 00003 epoch 2: valid r 0.300 (best 0.412), - samples/s")
    p.on_trial_complete(0, [], a)  # after 2 of 4 epochs: the scheduler stopped it; its 2 epochs left count as done
    assert _lines(caplog) == [
        "teachers-1a2b: trial 00003 stopped early after 2 epoch(s): best 0.412 "
        "| 1/2 done, 0 running | elapsed 10s | ETA ~10s"
    ]
    p.on_trial_start(0, [], b)
    p.on_trial_error(0, [], _trial("e154a_00004", ActorDiedError("node 10.0.0.3 died")))
    assert _lines(caplog)[-1] == (
        "teachers-1a2b: trial 00004 lost after 0 epoch(s) | 2/2 done, 0 running, 1 failed | elapsed 10s"
    )
    assert p.view()["rows"] == [
        {"trial": "00003", "state": "stopped", "epoch": 2, "last": 0.3, "best": 0.412, "samples_per_s": None,
         "data_wait": 0.12},
        {"trial": "00004", "state": "lost", "epoch": None, "last": None, "best": None},
    ]  # fmt: skip


def test_a_slow_input_pipeline_and_a_failed_trial_warn_once_each(clock, caplog):
    caplog.set_level(logging.INFO, logger="mdlda.sweep")
    p = SweepProgress(total=1, name="s")
    t = _trial("x_00000")
    for epoch, wait in enumerate((0.2, 0.45, 0.6), start=1):
        p.on_trial_result(0, [], t, {"valid_r_mean": 0.1, "training_iteration": epoch, "data_wait_fraction": wait})
    warnings = _lines(caplog, logging.WARNING)
    assert len(warnings) == 1 and warnings[0].startswith("trial 00000 waited for data 45% of an epoch")
    p.on_trial_error(0, [], _trial("x_00000", ValueError("loss is nan\nValueError: loss is nan")))
    assert _lines(caplog, logging.WARNING) == [
        "trial 00000 failed (ValueError: loss is nan): it is not selected; traceback in /sweep/x_00000/error.txt"
    ]


def test_durations_are_short():
    assert [progress._fmt_s(s) for s in (0, 59.9, 60, 3599, 3600, 7322)] == ["0s", "59s", "1m00s", "59m59s",
                                                                              "1h00m", "2h02m"]  # fmt: skip
