"""Built-in reward functions for online RL (method.grpo.rewards), and the contract every one follows.

A reward function is any Python function `f(prompt: str, completion: str, reference: str | None) ->
float`, named in a job as `module:function`. `prompt` is the row's prompt as written (not the chat
template around it), `completion` the sampled text without special tokens, `reference` the row's
reference answer or None. It is called once per completion, in the training worker; it must return a
finite number. These three check verifiable answers.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_TAGGED = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _normalized(text: str) -> str:
    """Lower case, outer whitespace and punctuation gone, inner whitespace single."""
    return " ".join(text.lower().split()).strip(" .,!?;:'\"")


def exact_answer(prompt: str, completion: str, reference: str | None) -> float:
    """1 when the whole completion is the reference answer (case, spacing and end punctuation aside)."""
    return float(reference is not None and _normalized(completion) == _normalized(reference))


def number_answer(prompt: str, completion: str, reference: str | None) -> float:
    """1 when the last number in the completion equals the reference number (arithmetic tasks)."""
    if reference is None:
        return 0.0
    found = _NUMBER.findall(completion)
    try:
        return float(bool(found) and float(found[-1]) == float(reference))
    except ValueError:
        return 0.0


def answer_tags(prompt: str, completion: str, reference: str | None) -> float:
    """Format: 0.5 for one <answer>...</answer> block; 1 when, with a reference, it holds that answer."""
    tagged = _TAGGED.findall(completion)
    if len(tagged) != 1:
        return 0.0
    if reference is None:
        return 1.0
    return 1.0 if _normalized(tagged[0]) == _normalized(reference) else 0.5
