"""Generate the topic-classification set for jobs/classify-minilm.yaml (CSV: text,label).

Short news-like sentences in four topics, built from templates and word lists; validation
sentences use templates not seen in training.

    python jobs/data/make_topics.py   # rewrites jobs/data/topics-{train,val}.csv
"""

import csv
import random
from pathlib import Path

TOPICS = {
    "sports": {
        "things": ["the striker", "the goalkeeper", "the coach", "the home team", "the tennis champion",
                   "the relay squad", "the cyclist", "the rookie pitcher"],
        "events": ["scored twice in the final", "signed a new contract", "won the championship",
                   "broke the national record", "was injured during practice", "lost on penalties"],
    },
    "technology": {
        "things": ["the startup", "the chip maker", "the new smartphone", "the open-source project",
                   "the cloud provider", "the robotics lab", "the search engine", "the laptop"],
        "events": ["released a faster processor", "patched a security flaw", "launched an AI assistant",
                   "doubled its battery life", "shipped a software update", "suffered a data breach"],
    },
    "food": {
        "things": ["the bakery", "the chef", "the new restaurant", "the farmers market", "the pastry shop",
                   "the vegan cafe", "the street vendor", "the cookbook author"],
        "events": ["introduced a spicy noodle dish", "won a award for its sourdough", "opened a pizza oven",
                   "started serving fresh dumplings", "created a chocolate dessert", "added seasonal soups"],
    },
    "weather": {
        "things": ["the storm", "the heatwave", "the cold front", "the forecast", "the hurricane",
                   "the fog", "the snowfall", "the monsoon"],
        "events": ["brought heavy rain to the coast", "pushed temperatures above forty degrees",
                   "caused flooding in the valley", "covered the roads with ice", "knocked out power lines",
                   "delayed flights with strong winds"],
    },
}
TRAIN_TEMPLATES = ["Reports say {t} {e}.", "This morning {t} {e}.", "{T} {e}, officials confirmed.",
                   "According to locals, {t} {e}.", "Breaking: {t} {e}."]
VAL_TEMPLATES = ["Last week {t} {e}.", "It is official: {t} {e}.", "Witnesses say {t} {e}."]


def sentence(template: str, topic: dict, rng: random.Random) -> str:
    thing, event = rng.choice(topic["things"]), rng.choice(topic["events"])
    return template.format(t=thing, T=thing[0].upper() + thing[1:], e=event)


def write(path: Path, templates: list[str], per_topic: int, rng: random.Random) -> None:
    rows = [(sentence(rng.choice(templates), words, rng), label)
            for label, words in TOPICS.items() for _ in range(per_topic)]
    rng.shuffle(rows)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    print(f"wrote {path} ({len(rows)} rows)")


def main() -> None:
    rng = random.Random(7)
    here = Path(__file__).parent
    write(here / "topics-train.csv", TRAIN_TEMPLATES, 80, rng)
    write(here / "topics-val.csv", VAL_TEMPLATES, 20, rng)


if __name__ == "__main__":
    main()
