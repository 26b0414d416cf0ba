"""Sweep budgets without a sweep: when the searcher stops launching trials (no Ray started)."""

from __future__ import annotations

import pytest

from pipelines import budget
from pipelines.budget import Budget, BudgetedVariantGenerator, set_budget


@pytest.fixture(autouse=True)
def no_budget():
    yield
    set_budget()  # the module's budget is per driver process: leave none for the next test


def test_max_trials_stops_at_the_count(monkeypatch):
    b = Budget(max_trials=2)
    assert b.reason(0) is None and b.reason(1) is None
    assert b.reason(2) == b.reason(3) == "max_trials=2 reached"
    assert Budget(max_trials=0).reason(0) == "max_trials=0 reached"  # 0: nothing launches, the stored sweep is read
    assert Budget().reason(10**6) is None


def test_the_time_budget_counts_from_set_budget(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(budget.time, "monotonic", lambda: now[0])
    b = set_budget(time_budget_s=30)
    assert b.started == 100.0 and b.reason(0) is None
    now[0] = 129.9
    assert b.reason(5) is None
    now[0] = 130.0
    assert b.reason(5) == "time budget of 30 s spent"
    assert Budget(max_trials=1, time_budget_s=30, started=100.0).reason(1) == "max_trials=1 reached"  # trials first


@pytest.mark.parametrize("kwargs", [{"max_trials": -1}, {"time_budget_s": -0.5}])
def test_negative_budgets_are_refused(kwargs):
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be >= 0"):
        set_budget(**kwargs)


def test_the_generator_finishes_once_the_drivers_budget_is_spent(monkeypatch):
    gen = BudgetedVariantGenerator()
    set_budget()
    assert not gen.is_finished()  # no budget: Tune's own rule (its variants are not all generated yet)
    set_budget(max_trials=2)
    gen.launched = 1
    assert not gen.is_finished()
    gen.launched = 2
    assert gen.is_finished()
    set_budget(max_trials=3)  # a resumed sweep given a larger budget launches again
    assert not gen.is_finished()


def test_the_generator_counts_only_the_trials_it_launched(monkeypatch):
    made = iter(["trial-1", None, "trial-2"])
    monkeypatch.setattr(budget.BasicVariantGenerator, "next_trial", lambda self: next(made))
    gen = BudgetedVariantGenerator()
    assert [gen.next_trial() for _ in range(3)] == ["trial-1", None, "trial-2"]
    assert gen.launched == 2  # None: no trial this step, nothing counted
