"""Progress display: a rich progress bar on a terminal, one plain line per log step elsewhere
(Ray worker logs, CI, files)."""

from __future__ import annotations

import sys
import time
from typing import Any

from ftcluster.track.tables import format_duration


class Progress:
    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.total = total_steps
        self.enabled = enabled
        self.started = time.perf_counter()
        self.start_step = start_step
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
            self.bar.start()

    def eta(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return 0.0
        return (time.perf_counter() - self.started) / done * (self.total - step)

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        info = f"loss {metrics.get('train_loss', float('nan')):.4f} | {metrics.get('tokens_per_s', 0):,.0f} tok/s"
        if "reward" in metrics:  # online RL: what the samples scored, and how far from the reference
            info += f" | reward {metrics['reward']:.3f} | kl {metrics['kl']:.4f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            print(f"step {step}/{self.total} | {info} | ETA {format_duration(self.eta(step))}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
