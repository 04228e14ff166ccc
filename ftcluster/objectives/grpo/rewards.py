"""Scoring completions for online RL: the job's reward functions (imported by name, never evaluated from
text) and, optionally, a trained reward model; each source's raw scores, and their weighted sum.

A function that raises, returns anything but a finite number, or does not return within
method.grpo.reward_timeout_s, ends the run with one line naming the function and the prompt: a reward
that silently became 0 would train the wrong thing, and one that hangs would hang the run.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ftcluster.core.bounded import call_bounded
from ftcluster.core.errors import FtError, first_line

RewardFn = Callable[[str, str, str | None], Any]
REWARD_MODEL = "reward_model"  # the reward model's name among the sources


# The folders the launching machine found the reward modules in (os.pathsep-separated): forwarded to
# every worker and sweep trial like any FTCLUSTER_* setting, and searched there.
CODE_PATH = "FTCLUSTER_CODE_PATH"


def code_folders() -> list[str]:
    """Where reward modules are looked for after the Python path: the current folder, then the folders
    the launcher shared (FTCLUSTER_CODE_PATH)."""
    return [os.getcwd(), *filter(None, os.environ.get(CODE_PATH, "").split(os.pathsep))]


def load_reward_function(name: str) -> RewardFn:
    """The function `module:function` names, imported from the Python path or the `code_folders`."""
    module_name, _, attribute = name.partition(":")
    for folder in code_folders():
        if folder not in sys.path:
            sys.path.append(folder)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail to import in any way
        raise FtError(f"method.grpo.rewards: cannot import {module_name} for {name} ({first_line(exc)})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise FtError(f"method.grpo.rewards: {module_name} has no function {attribute!r} ({name})")
    return function


def share_reward_code(settings) -> None:
    """On the launching machine: import every reward function now (a missing one fails before any worker
    starts) and share the folders their modules came from, so workers in other processes find them."""
    if settings is None:
        return
    folders = [folder for folder in os.environ.get(CODE_PATH, "").split(os.pathsep) if folder]
    for reward in settings.rewards:
        load_reward_function(reward.function)
        module_name = reward.function.partition(":")[0]
        source = Path(sys.modules[module_name].__file__ or "").resolve()
        levels = module_name.count(".") + (source.name == "__init__.py")
        folders.append(str(source.parents[levels]))
    if folders:
        os.environ[CODE_PATH] = os.pathsep.join(dict.fromkeys(folders))


def checked_reward(value: Any, source: str, prompt_index: int) -> float:
    """The reward as a float, or a one-line error naming its source and prompt."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FtError(f"reward {source} returned {type(value).__name__} {str(value)[:40]!r}, not a number, "
                      f"for prompt {prompt_index}")
    number = float(value)
    if not math.isfinite(number):
        raise FtError(f"reward {source} returned {number} for prompt {prompt_index}; rewards must be finite")
    return number


def called(function: RewardFn, name: str, prompt_index: int, prompt: str, completion: str, reference: str | None,
           timeout_s: float) -> Any:
    """The function's value for one completion, within ``timeout_s``; what it raises, or a call that does
    not return in time, becomes a one-line error naming it and the prompt. A signal stops the wait."""
    try:
        return call_bounded(lambda: function(prompt, completion, reference), timeout_s)
    except TimeoutError:
        raise FtError(f"reward {name} did not return within method.grpo.reward_timeout_s={timeout_s:g} s "
                      f"(prompt {prompt_index}: {prompt[:60]!r}); fix the function or raise the limit") from None
    except Exception as exc:  # the user's code may raise anything
        raise FtError(f"reward {name} raised {type(exc).__name__}: {first_line(exc)} (prompt {prompt_index})") from None


class RewardModelScorer:
    """A finished reward-model run's merged weights, scoring (prompt, completion) as it was trained to:
    the conversation rendered by its own tokenizer's chat template, read at the last token."""

    def __init__(self, run: str, device, autocast):
        from ftcluster.data.formats import Example
        from ftcluster.data.render import Renderer
        from ftcluster.runs.export import load_finetuned

        model, tokenizer, spec = load_finetuned(run, merged=True)
        if spec.method.objective != "reward":
            raise FtError(f"method.grpo.reward_model.run: {run} trained method.objective {spec.method.objective}, "
                          "not reward")
        self.model = model.to(device).eval()
        self.renderer, self.device, self.autocast, self.example = Renderer(tokenizer, spec.data.max_length), device, autocast, Example
        self.pad_id = tokenizer.pad_token_id

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        from ftcluster.data.batches import collate, model_inputs

        items = [self.renderer.encode(self.example(messages=[{"role": "user", "content": prompt},
                                                            {"role": "assistant", "content": completion}]))
                 for prompt, completion in zip(prompts, completions)]
        batch = {k: v.to(self.device) for k, v in collate(items, self.pad_id).items()}
        with self.autocast():
            return self.model(**model_inputs(batch)).logits[:, 0].float().tolist()


class RewardScorer:
    """Every reward source of a job: raw scores per source, and the weighted total per completion."""

    def __init__(self, settings, device, autocast):
        self.functions = [(spec.function, load_reward_function(spec.function)) for spec in settings.rewards]
        self.timeout_s = settings.reward_timeout_s
        self.names = [name.partition(":")[2] for name, _ in self.functions]  # metric names: reward/exact_answer
        weights = [spec.weight for spec in settings.rewards]
        self.model = None
        if settings.reward_model is not None:
            self.model = RewardModelScorer(settings.reward_model.run, device, autocast)
            self.names.append(REWARD_MODEL)
            weights.append(settings.reward_model.weight)
        self.weights = torch.tensor(weights)

    def score(self, prompts: list[str], completions: list[str], references: list[str | None],
              prompt_indices: list[int]) -> torch.Tensor:
        """(completions, sources) raw scores; prompts, references and indices are per completion."""
        rows = [[checked_reward(called(function, name, index, prompt, completion, reference, self.timeout_s), name, index)
                 for name, function in self.functions]
                for prompt, completion, reference, index in zip(prompts, completions, references, prompt_indices)]
        scores = torch.tensor(rows, dtype=torch.float32).reshape(len(completions), len(self.functions))
        if self.model is not None:
            judged = torch.tensor(self.model(prompts, completions)).unsqueeze(1)
            for value, index in zip(judged[:, 0].tolist(), prompt_indices):
                checked_reward(value, REWARD_MODEL, index)
            scores = torch.cat([scores, judged], dim=1)
        return scores

    def total(self, scores: torch.Tensor) -> torch.Tensor:
        return scores @ self.weights
