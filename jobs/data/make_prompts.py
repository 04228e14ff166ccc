"""Generate the GRPO demo's prompts: short factual questions whose answer is one word or name.

SmolLM2-135M-Instruct knows most of these facts but answers in a sentence ("The capital of France
is Paris."), so the exact-answer reward starts near 0; online RL must teach it to answer with the
answer alone. Held-out prompts ask about facts never seen in training.

    python jobs/data/make_prompts.py   # rewrites jobs/data/prompts-{train,val}.jsonl
"""

import random

from make_preferences import CAPITALS, COLORS, OPPOSITES, write_split

INSTRUCTION = " Reply with the answer only."
TEMPLATES = {
    "capital": ("What is the capital of {}?", CAPITALS),
    "opposite": ("What is the opposite of {}?", OPPOSITES),
    "color": ("What color is {}?", COLORS),
}


def rows() -> list[dict]:
    out = []
    for kind, (template, facts) in TEMPLATES.items():
        for subject, answer in facts.items():
            out.append({"prompt": template.format(subject) + INSTRUCTION, "reference": answer, "kind": kind})
    return out


def main() -> None:
    every = rows()
    random.Random(0).shuffle(every)
    held_out, train = every[:24], every[24:]
    write_split("prompts-train.jsonl", train, "prompts")
    write_split("prompts-val.jsonl", held_out, "prompts")


if __name__ == "__main__":
    main()
