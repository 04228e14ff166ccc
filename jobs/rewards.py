"""The GRPO demo's reward function: an example of the contract (see ftcluster/rewards.py and the README).

    reward(prompt, completion, reference) -> float, called once per sampled completion.
"""

from ftcluster.rewards import exact_answer


def concise_answer(prompt: str, completion: str, reference: str | None) -> float:
    """1 for the answer alone; for a reply that contains the answer among other words, 1 / its word count
    (the sentence "The capital of Ireland is Dublin." earns 1/6), so that shorter correct replies beat
    longer ones and the first rollouts have something to tell apart; 0 for a reply without the answer."""
    if exact_answer(prompt, completion, reference):
        return 1.0
    if reference is None or reference.lower() not in completion.lower():
        return 0.0
    return 1.0 / max(len(completion.split()), 1)
