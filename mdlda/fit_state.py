"""The resumable state of :func:`mdlda.training.fit`: what it keeps between epochs (the best epoch, the early
stopping count, the history, the random generators), and the full state of :meth:`FitState.snapshot`, which
:meth:`FitState.restore` reads back line by line so a resumed run continues as if never interrupted."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from mdlda.checkpoints import restore_rng_state, to_cpu

logger = logging.getLogger("mdlda.training")  # the loop's own lines: one logger for a whole run

STATE_FORMAT = 1


def state_of(module: nn.Module | None) -> dict[str, Tensor] | None:
    return None if module is None else to_cpu(module.state_dict())


class FitState:
    """The bookkeeping half of the loop; the loop (:class:`mdlda.training._Fit`) sets ``model``, ``head``,
    ``config``, ``optimizer``, ``scheduler`` and ``precision``."""

    def init_state(self) -> None:
        self.next_epoch, self.bad_epochs = 0, 0
        self.best_score, self.best_epoch = -math.inf, None
        self.best_criterion = -math.inf  # the select_on number at the best epoch, larger is better
        self.best_model: dict[str, Tensor] | None = None
        self.best_head: dict[str, Tensor] | None = None
        self.history: list[dict[str, float]] = []
        self.rng: dict[str, Any] = {}

    def snapshot(self) -> dict[str, Any]:
        scaler = self.precision.scaler
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "next_epoch": self.next_epoch,
            "model": state_of(self.model),
            "domain_head": state_of(self.head),
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "scheduler": to_cpu(self.scheduler.state_dict()),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "best_score": self.best_score,
            "best_criterion": self.best_criterion,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "best_model": self.best_model,
            "best_domain_head": self.best_head,
            "history": [dict(h) for h in self.history],
            "rng": self.rng,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"training state format {state.get('format')!r}; this code reads {STATE_FORMAT}")
        saved, now = state["config"], self.config.to_dict()
        if saved.get("mode") != now["mode"]:
            raise ValueError(f"cannot resume a {saved.get('mode')!r} run in mode {now['mode']!r}")
        changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
        if changed:
            logger.warning("resuming with a changed config: %s", ", ".join(changed))
        self.model.load_state_dict(state["model"])
        if self.head is not None:
            self.head.load_state_dict(state["domain_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        self.next_epoch, self.bad_epochs = int(state["next_epoch"]), int(state["bad_epochs"])
        self.best_score, self.best_epoch = float(state["best_score"]), state["best_epoch"]
        self.best_criterion = float(state.get("best_criterion", state["best_score"]))  # older states: r_mean
        self.best_model, self.best_head = state["best_model"], state["best_domain_head"]
        self.history = [dict(h) for h in state["history"]]
        self.rng = state["rng"]
        restore_rng_state(state["rng"])

    def patience_message(self) -> str:
        return (
            f"no better validation {self.config.select_on} for {self.config.patience} epochs; best r_mean "
            f"{self.best_score:.4f} at epoch {self.best_epoch}"
        )
