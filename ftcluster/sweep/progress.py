"""One console line per trial event while a sweep runs (Ray Tune's own tables are turned off)."""

from __future__ import annotations

import time

from ray.tune import Callback
from rich.console import Console


class SweepProgress(Callback):
    def __init__(self, metric: str, planned: int):
        self.metric = metric
        self.planned = planned
        self.started = time.monotonic()
        self.done = 0
        self.best: float | None = None

    def _say(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        Console(highlight=False).print(f"[dim]{elapsed:6.0f}s[/] [{self.done}/{self.planned}] {text}")

    def on_trial_start(self, iteration, trials, trial, **info):
        values = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
        self._say(f"trial {trial.trial_id} started: {values}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(self.metric) is not None and "completed" not in result:
            who = result.get("member") or trial.trial_id  # a shared-base pack's reports name its trial
            self._say(f"trial {who} step {result.get('step')}: {self.metric} {result[self.metric]:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        last = trial.last_result or {}
        how = "completed" if last.get("completed") else "stopped by the scheduler"
        value = last.get(self.metric)
        shown = f", {self.metric} {value:.4f}" if value is not None else ""
        self._say(f"trial {trial.trial_id} {how} at step {last.get('step')}{shown}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        self._say(f"[red]trial {trial.trial_id} failed[/] (see its folder's trial.json)")


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."
