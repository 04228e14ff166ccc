"""Generate the quickstart task: pull the person and the city out of a sentence as `NAME|CITY`.

SmolLM2-135M-Instruct understands the sentences but ignores the strict output format (it
answers in prose), so exact match starts near 0%; a few minutes of LoRA teach the format.
Validation uses sentence templates never seen in training, so the metric measures the skill,
not memorised sentences.

    python jobs/data/make_quickstart.py   # rewrites jobs/data/quickstart-{train,val}.jsonl
"""

import json
import random
from pathlib import Path

NAMES = """Maria John Aiko Pedro Fatima Lars Chen Olga Amir Sofia Kwame Elena Raj Ingrid Diego Yuki
Nadia Tom Leila Marco Hana Ivan Zara Omar Greta Luis Mei Anton Priya Felix Rosa Kenji Amara Paul
Noor Sven Lucia Tariq Emma Hugo""".split()
CITIES = """Lisbon Denver Osaka Lima Cairo Oslo Dublin Perth Madrid Boston Seoul Nairobi Vienna Quito
Hanoi Zurich Porto Austin Kyoto Accra Prague Dallas Bergen Manila Tunis Krakow Seattle Havana
Munich Sydney Bogota Milan Chicago Dakar Athens Riga Toronto Santiago Cork Lyon""".split()
TRAIN_TEMPLATES = [
    "{n} moved to {c} last spring.",
    "Yesterday {n} flew to {c} for a conference.",
    "In {c}, {n} opened a small bakery.",
    "{n} has lived in {c} for ten years.",
    "The museum in {c} hired {n} as a guide.",
    "After graduating, {n} found a job in {c}.",
    "{n} is visiting friends in {c} this week.",
    "Our new colleague {n} commutes from {c}.",
    "Last night {n} gave a concert in {c}.",
    "{n} bought an apartment near the river in {c}.",
    "A marathon in {c} was won by {n}.",
    "{n} grew up in a quiet street of {c}.",
    "The train to {c} was late, so {n} took a taxi.",
    "Everyone in {c} knows {n} from the radio.",
]
VAL_TEMPLATES = [
    "{n} will spend the winter in {c}.",
    "Rumour says {n} sold the family farm near {c}.",
    "The mayor of {c} thanked {n} for the donation.",
    "{n} photographed the old harbour of {c}.",
    "When {n} arrived in {c}, it was raining.",
]
INSTRUCTION = "Extract the person's name and the city. Reply exactly as NAME|CITY."


def rows(templates: list[str], count: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(count):
        name, city, template = rng.choice(NAMES), rng.choice(CITIES), rng.choice(templates)
        out.append({"instruction": INSTRUCTION, "input": template.format(n=name, c=city), "output": f"{name}|{city}"})
    return out


def main() -> None:
    rng = random.Random(1234)
    here = Path(__file__).parent
    for split, templates, count in (("train", TRAIN_TEMPLATES, 480), ("val", VAL_TEMPLATES, 48)):
        path = here / f"quickstart-{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows(templates, count, rng)))
        print(f"wrote {path} ({count} rows)")


if __name__ == "__main__":
    main()
