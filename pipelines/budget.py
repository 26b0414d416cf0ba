"""Sweep budgets: stop launching new trials after ``--max-trials`` trials or ``--time-budget`` seconds of wall
time, let the running trials finish, and select from what finished.

Tune's own ``time_budget_s`` stops the running trials too (their last epochs are lost) and has no trial cap, so
the budget lives in the search algorithm instead: :class:`BudgetedVariantGenerator` is Tune's default generator
that reports itself finished once the budget is spent. ``max_trials`` counts every trial the sweep ever launched
(the count is part of the searcher state Tune saves, so a resumed sweep keeps it); the time budget counts the wall
time of the current command, so rerunning an interrupted sweep gives it a fresh budget. The budget is set per
driver process (:func:`set_budget`) rather than pickled with the searcher, so a resumed sweep can be given a new
one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ray.tune.search.basic_variant import BasicVariantGenerator


@dataclass
class Budget:
    max_trials: int | None = None
    time_budget_s: float | None = None
    started: float = 0.0

    def reason(self, launched: int) -> str | None:
        """Why no further trial may start (None while the budget lasts)."""
        if self.max_trials is not None and launched >= self.max_trials:
            return f"max_trials={self.max_trials} reached"
        if self.time_budget_s is not None and time.monotonic() - self.started >= self.time_budget_s:
            return f"time budget of {self.time_budget_s:g} s spent"
        return None


_BUDGET = Budget()


def set_budget(max_trials: int | None = None, time_budget_s: float | None = None) -> Budget:
    """The budget of the sweep this driver runs next; the clock starts now."""
    for name, value in (("max_trials", max_trials), ("time_budget_s", time_budget_s)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    global _BUDGET
    _BUDGET = Budget(max_trials, time_budget_s, time.monotonic())
    return _BUDGET


class BudgetedVariantGenerator(BasicVariantGenerator):
    """Tune's default variant generator, finished early when the driver's budget is spent."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.launched = 0

    def is_finished(self) -> bool:
        return super().is_finished() or _BUDGET.reason(self.launched) is not None

    def next_trial(self):
        trial = super().next_trial()
        if trial is not None:
            self.launched += 1
        return trial
