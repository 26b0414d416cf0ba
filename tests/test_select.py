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
    losses: list[float] | None = None  # per epoch; 0.1 throughout when None
    checkpoint = None

    @property
    def metrics_dataframe(self) -> pd.DataFrame:
        df = pd.DataFrame({"valid_r_mean": self.scores, "valid_loss": self.losses or [0.1] * len(self.scores)})
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


class ActorDiedError(Exception):
    """Named like Ray's: a trial whose worker went away."""


def test_ties_go_to_the_lower_loss_at_the_best_epoch_then_the_trial_id():
    nan = float("nan")
    results = [
        FakeResult("a", [0.5], True, losses=[0.3]),
        FakeResult("f", [0.7], True, error=RuntimeError("diverged")),
        FakeResult("c", [0.5], True, losses=[0.2]),
        FakeResult("d", [0.6, 0.4], True, losses=[0.9, 0.1]),  # the loss at its best epoch (0.9) is what counts
        FakeResult("e", [nan, nan], True),
        FakeResult("b", [0.4, 0.5], True, losses=[0.1, 0.2]),
        FakeResult("g", [0.8], True, error=ActorDiedError("node gone")),
    ]
    table = rank_trials(results)
    assert table.trial_id.tolist()[:4] == ["d", "b", "c", "a"]  # then the unranked trials, by trial id
    by_id = table.set_index("trial_id")
    assert by_id.loc["d", ["valid_loss", "best_epoch"]].tolist() == [0.9, 0]
    assert by_id.loc[["d", "b", "c", "a"], "rank"].tolist() == [1, 2, 3, 4]
    assert by_id.loc[["e", "f", "g"], "status"].tolist() == ["no_score", "error", "lost"]
    assert by_id.loc[["e", "f", "g"], "rank"].isna().all()
    assert select_top_k(table, 2).trial_id.tolist() == ["d", "b"]
    with pytest.raises(SelectionError, match=r"only 4 of 7 .*\(2 failed or diverged, 1 lost .*, 0 cut"):
        select_top_k(table, 5)
    assert select_top_k(table, 5, allow_fewer=True).trial_id.tolist() == ["d", "b", "c", "a"]
    assert rank_trials(list(reversed(results))).trial_id.tolist() == table.trial_id.tolist()  # input order is moot
