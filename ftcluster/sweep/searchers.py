"""Where trials' values come from (random, grid, Optuna) and the budget that stops new trials.

All three are Ray Tune ``Searcher``s so one budget wrapper works for every one of them: once
the trials' reported GPU-hours or dollars reach the budget, no new trial starts, while the
running ones finish and the sweep reports what it found.
"""

from __future__ import annotations

import pickle
import random
from typing import Any

from ray.tune.search import Searcher

from ftcluster.sweep.space import SearchSpace

SEARCHERS = ("random", "grid", "optuna")


class PickledState:
    """Save/restore the searcher's whole state, so `ftcluster tune --resume` continues its sequence."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))


class RandomSearcher(PickledState, Searcher):
    """Independent random samples (seeded); grid keys cycle through their grid."""

    def __init__(self, space: SearchSpace, seed: int, metric: str | None = None, mode: str | None = None):
        super().__init__(metric=metric, mode=mode)
        self.space = space
        self.rng = random.Random(seed)
        self.points = space.grid_points()
        self.count = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        point = self.points[self.count % len(self.points)]
        self.count += 1
        return {**self.space.random_sample(self.rng), **point}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass


class GridSearcher(RandomSearcher):
    """Every grid point once (random values for keys that are not on the grid), then done."""

    # Ray's stub: Searcher.suggest is annotated Optional[Dict], though it documents and handles Searcher.FINISHED.
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        if self.count >= len(self.points):
            return Searcher.FINISHED
        return super().suggest(trial_id)


def make_searcher(name: str, space: SearchSpace, metric: str, mode: str, seed: int) -> Searcher:
    if name == "random":
        return RandomSearcher(space, seed, metric, mode)
    if name == "grid":
        return GridSearcher(space, seed, metric, mode)
    from ray.tune.search.optuna import OptunaSearch

    if space.grid:
        raise ValueError("searcher optuna: grid keys are not supported; use choice")
    domains = OptunaSearch.convert_search_space({p.path: p.domain() for p in space.sampled})
    return OptunaSearch(space=domains, metric=metric, mode=mode, seed=seed)


class BudgetLimiter(Searcher):
    """Wraps a searcher; refuses new trials once the trials' spend reaches the budget."""

    def __init__(self, searcher: Searcher, max_gpu_hours: float | None, max_cost_usd: float | None):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher
        self.max_gpu_hours = max_gpu_hours
        self.max_cost_usd = max_cost_usd
        self.spent: dict[str, dict[str, float]] = {}  # trial id -> latest gpu_hours / cost_usd reported
        self.exhausted = False

    def totals(self) -> dict[str, float]:
        return {key: sum(row.get(key) or 0.0 for row in self.spent.values()) for key in ("gpu_hours", "cost_usd")}

    def over_budget(self) -> bool:
        totals = self.totals()
        return (self.max_gpu_hours is not None and totals["gpu_hours"] >= self.max_gpu_hours) or (
            self.max_cost_usd is not None and totals["cost_usd"] >= self.max_cost_usd
        )

    def suggest(self, trial_id: str):
        if self.over_budget():
            self.exhausted = True
            return Searcher.FINISHED
        return self.searcher.suggest(trial_id)

    def _record(self, trial_id: str, result: dict | None) -> None:
        if result:
            self.spent[trial_id] = {k: result[k] for k in ("gpu_hours", "cost_usd") if result.get(k) is not None}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._record(trial_id, result)
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._record(trial_id, result)
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    # A wrapper's own state: Ray Tune saves and restores the wrapped searcher separately.
    def get_state(self) -> dict:
        return {"spent": self.spent, "exhausted": self.exhausted}

    def set_state(self, state: dict) -> None:
        self.spent, self.exhausted = state["spent"], state["exhausted"]
