"""What the loop records: the metrics file, and the window of steps between two log lines."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ftcluster.core.atomic import write_text_atomic


class MetricsLog:
    """Appends one JSON object per line to OUTPUT/metrics.jsonl (main worker only)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path = path
        self.enabled = enabled
        if enabled and resume_step is not None and path.is_file():
            # Drop what the interrupted run logged after the checkpoint we resume from.
            kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= resume_step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def tokens_in(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a host-side batch; packed batches have no padding to speak of. A
    rollout's prompts count once, not once per completion (see evaluation/shared_prompt.py)."""
    if "position_ids" in batch:
        return batch["input_ids"].numel()
    masks = [key for key in ("attention_mask", "prompt_mask", "completion_mask") if key in batch]
    return sum(int(batch[key].sum()) for key in masks)


class LogWindow:
    """The steps since the last log line, and the run's totals of tokens and training time.

    The window's loss stays on the device (no host sync per step) until `close` turns it into numbers.
    Evaluation and checkpoint time is not training time: `restart_clock` after them.
    """

    def __init__(self, device: torch.device, tokens_seen: int = 0, train_seconds: float = 0.0):
        self.loss = torch.zeros((), device=device)
        self.steps = 0
        self.tokens = 0  # this worker's real tokens in the window
        self.started = time.perf_counter()
        self.tokens_seen = tokens_seen  # all workers, whole run
        self.train_seconds = train_seconds
        self._loss_since_eval = 0.0
        self._steps_since_eval = 0

    def add_step(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def restart_clock(self) -> None:
        self.started = time.perf_counter()

    def close(self, world_size: int, all_reduce) -> dict[str, float]:
        """End the window: its mean loss over every worker, its speed; the counters start again."""
        if world_size > 1:
            all_reduce(self.loss)
            self.loss /= world_size
        elapsed = time.perf_counter() - self.started
        self.train_seconds += elapsed
        self.tokens_seen += self.tokens * world_size
        numbers = {"train_loss": float(self.loss) / self.steps, "elapsed": elapsed, "steps": self.steps,
                   "tokens_per_s": self.tokens * world_size / elapsed}
        self._loss_since_eval += numbers["train_loss"] * self.steps
        self._steps_since_eval += self.steps
        self.loss.zero_()
        self.steps, self.tokens = 0, 0
        self.restart_clock()
        return numbers

    def mean_loss_since_eval(self) -> float:
        """The mean logged training loss since the previous call (the overfitting detector compares it)."""
        mean = self._loss_since_eval / max(self._steps_since_eval, 1)
        self._loss_since_eval, self._steps_since_eval = 0.0, 0
        return mean
