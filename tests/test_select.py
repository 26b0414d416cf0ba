"""The selection's eligibility rule on result objects shaped like Ray Tune's (no Ray needed)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pytest

from pipelines.select import SelectionError, rank_trials, select_top_k


@dataclass
class FakeResult:
    trial_id: str
    scores: list[float]
    trained_out: bool | None  # None: a sweep stored before the flag existed
    error: Exception | None = None
    checkpoint = None

    @property
    def metrics_dataframe(self) -> pd.DataFrame:
        df = pd.DataFrame({"valid_r_mean": self.scores, "valid_loss": [0.1] * len(self.scores)})
        df["epoch"] = range(len(df))
        if self.trained_out is not None:
            df["trained_out"] = [0.0] * (len(df) - 1) + [float(self.trained_out)]
        return df

    @property
    def metrics(self) -> dict:
        return {"trial_id": self.trial_id}

    @property
    def path(self) -> str:
        return f"/sweep/{self.trial_id}"


def test_trials_cut_by_the_scheduler_are_not_selected():
    results = [
        FakeResult("a", [0.2, 0.5], trained_out=True),
        FakeResult("b", [0.9], trained_out=False),  # ASHA stopped it at its grace period: lucky, not comparable
        FakeResult("c", [0.3, 0.4], trained_out=None),
    ]
    table = rank_trials(results)
    assert table.set_index("trial_id").status.to_dict() == {"a": "finished", "c": "finished", "b": "cut"}
    assert select_top_k(table, 2).trial_id.tolist() == ["a", "c"]
    with pytest.raises(SelectionError, match="1 cut early by the scheduler.*select_cut"):
        select_top_k(table, 3)
    assert rank_trials(results, include_cut=True).trial_id.tolist()[:3] == ["b", "a", "c"]
