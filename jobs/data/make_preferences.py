"""Generate the DPO demo's preference pairs: the preferred reply states the answer in UPPERCASE.

SmolLM2-135M-Instruct answers these questions correctly in normal case, so its own preference
between the two replies (same words, different case) starts near 0%; DPO must flip it without any
new facts. Held-out pairs use question templates and facts never seen in training.

    python jobs/data/make_preferences.py   # rewrites jobs/data/preferences-{train,val}.jsonl
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens",
    "Canada": "Ottawa", "Chile": "Santiago", "Austria": "Vienna", "Portugal": "Lisbon", "Ireland": "Dublin",
    "Poland": "Warsaw", "Cuba": "Havana", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi",
    "Mexico": "Mexico City", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Ghana": "Accra", "Senegal": "Dakar", "Argentina": "Buenos Aires",
    "Colombia": "Bogota", "Hungary": "Budapest", "Belgium": "Brussels", "Turkey": "Ankara", "Iran": "Tehran",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "strong": "weak", "open": "closed", "rich": "poor", "full": "empty", "high": "low", "young": "old",
    "hard": "soft", "loud": "quiet", "wet": "dry", "thick": "thin", "near": "far", "clean": "dirty",
    "easy": "difficult", "long": "short", "cheap": "expensive", "safe": "dangerous", "true": "false",
}
COLORS = {
    "grass": "green", "the sky on a clear day": "blue", "snow": "white", "a ripe banana": "yellow",
    "coal": "black", "a ripe tomato": "red", "an orange": "orange", "chocolate": "brown", "a lemon": "yellow",
    "milk": "white", "a stop sign": "red", "a carrot": "orange", "the sea": "blue", "a crow": "black",
}
TRAIN_TEMPLATES = [
    ("capital", "What is the capital of {k}?", "The capital of {k} is {v}."),
    ("opposite", "What is the opposite of {k}?", "The opposite of {k} is {v}."),
    ("color", "What color is {k}?", "{K} is {v}."),
]
VAL_TEMPLATES = [
    ("capital", "Which city is the capital of {k}?", "{v} is the capital of {k}."),
    ("opposite", "Give me a word that means the opposite of {k}.", "{V} is the opposite of {k}."),
    ("color", "Tell me the usual color of {k}.", "The usual color of {k} is {v}."),
]
FACTS = {"capital": CAPITALS, "opposite": OPPOSITES, "color": COLORS}


def pairs(templates, facts: dict[str, list[tuple[str, str]]]) -> list[dict]:
    rows = []
    for kind, question, answer in templates:
        for key, value in facts[kind]:
            reply = answer.format(k=key, v=value, K=key[:1].upper() + key[1:], V=value[:1].upper() + value[1:])
            rows.append({"prompt": question.format(k=key), "chosen": reply.upper(), "rejected": reply})
    return rows


def write_split(name: str, rows: list[dict], unit: str) -> None:
    """Write `rows` as JSON lines to jobs/data/`name` and say how many `unit` it holds."""
    path = Path(__file__).parent / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{path}: {len(rows)} {unit}")


def main() -> None:
    rng = random.Random(7)
    train_facts, val_facts = {}, {}
    for kind, table in FACTS.items():
        items = sorted(table.items())
        rng.shuffle(items)
        cut = len(items) * 3 // 4
        train_facts[kind], val_facts[kind] = items[:cut], items[cut:]
    train, val = pairs(TRAIN_TEMPLATES, train_facts), pairs(VAL_TEMPLATES, val_facts)
    rng.shuffle(train)
    write_split("preferences-train.jsonl", train, "pairs")
    write_split("preferences-val.jsonl", val, "pairs")


if __name__ == "__main__":
    main()
