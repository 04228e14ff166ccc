"""Watching validation metrics: early stopping with patience, and the overfitting signal."""

from __future__ import annotations

from typing import Any

from ftcluster.core.errors import FtError


class EarlyStopper:
    """Tracks the best value of one metric; `should_stop` after `patience` evaluations without improvement."""

    def __init__(self, metric: str, mode: str, patience: int | None, state: dict[str, Any] | None = None,
                 min_delta: float = 0.0):
        self.metric = metric
        self.min_delta = min_delta
        self.mode = mode
        self.patience = patience
        state = state or {}
        self.best: float | None = state.get("best")
        self.best_step: int | None = state.get("best_step")
        self.bad_evals: int = state.get("bad_evals", 0)
        self.evals: int = state.get("evals", 0)

    def update(self, scores: dict[str, float], step: int) -> bool:
        """Record an evaluation; True when it is the best so far."""
        if self.metric not in scores:
            raise FtError(f"eval.metric: {self.metric!r} is not computed by this job (available: {', '.join(sorted(scores))})")
        value = scores[self.metric]
        self.evals += 1
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals, "evals": self.evals}

    def best_record(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.best, "step": self.best_step}


class OverfitDetector:
    """Signals overfitting: validation loss rose while training loss fell, `evals` times in a row."""

    def __init__(self, evals: int, state: dict[str, Any] | None = None):
        self.evals = evals
        state = state or {}
        self.previous: tuple[float, float] | None = tuple(state["previous"]) if state.get("previous") else None
        self.streak: int = state.get("streak", 0)

    def update(self, train_loss: float, val_loss: float | None) -> bool:
        if val_loss is None:
            return False
        if self.previous is not None:
            previous_train, previous_val = self.previous
            diverging = val_loss > previous_val and train_loss < previous_train
            self.streak = self.streak + 1 if diverging else 0
        self.previous = (train_loss, val_loss)
        return self.streak >= self.evals

    def state(self) -> dict[str, Any]:
        return {"previous": list(self.previous) if self.previous else None, "streak": self.streak}
