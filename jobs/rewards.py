"""The GRPO demo's reward function: an example of the contract (see ftcluster/rewards.py and the README).

    reward(prompt, completion, reference) -> float, called once per sampled completion.
"""

from ftcluster.rewards import exact_answer


def concise_answer(prompt: str, completion: str, reference: str | None) -> float:
    """1 for the answer alone; 0.25 for a reply of at most four words that contains it (a step on the
    way, which gives the first rollouts something to tell apart); 0 otherwise."""
    if exact_answer(prompt, completion, reference):
        return 1.0
    if reference is not None and len(completion.split()) <= 4 and reference.lower() in completion.lower():
        return 0.25
    return 0.0
