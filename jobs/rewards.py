"""The GRPO demo's reward function: an example of the contract (see ftcluster/rewards.py and the README).

    reward(prompt, completion, reference) -> float, called once per sampled completion.
"""

import re

from ftcluster.rewards import exact_answer

WORD = re.compile(r"\w+")  # a word: a run of letters and digits


def concise_answer(prompt: str, completion: str, reference: str | None) -> float:
    """1 for the answer alone; for a reply that has the answer among other words, 1 / its word count
    (the sentence "The capital of Ireland is Dublin." earns 1/6), so that shorter correct replies beat
    longer ones and the first rollouts have something to tell apart; 0 for a reply without the answer.
    Words are runs of letters and digits, and the answer must be whole words of the reply: policies
    trained on looser rules learned to glue the answer to other letters ("orange.red.blue",
    "poorrustoprophy") and be paid for it."""
    if exact_answer(prompt, completion, reference):
        return 1.0
    if reference is None:
        return 0.0
    words, answer = WORD.findall(completion.lower()), WORD.findall(reference.lower())
    contains = any(words[start:start + len(answer)] == answer for start in range(len(words)))
    return 1.0 / len(words) if answer and contains else 0.0
