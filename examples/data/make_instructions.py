"""Writes examples/data/instructions.jsonl: a small instruction data set for the QLoRA example
(short arithmetic, unit conversion, word and list tasks with one exact answer each), generated
from templates with a fixed seed so the file can be checked and regenerated.

    python examples/data/make_instructions.py [--count 400]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = [
    "halo",
    "river",
    "garden",
    "pencil",
    "window",
    "orange",
    "planet",
    "silver",
    "castle",
    "forest",
    "yellow",
    "rocket",
    "bridge",
    "candle",
    "summer",
    "winter",
    "market",
    "guitar",
    "island",
    "meadow",
]
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "early": "late",
    "open": "closed",
    "full": "empty",
    "up": "down",
    "old": "new",
    "strong": "weak",
    "high": "low",
}
UNITS = [
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("liters", "milliliters", 1000),
]


def example(rng: random.Random) -> dict:
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randrange(2, 60), rng.randrange(2, 60)
        return {"instruction": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
    if kind == 1:
        a, b = rng.randrange(2, 13), rng.randrange(2, 13)
        return {"instruction": f"What is {a} times {b}?", "response": f"{a} times {b} is {a * b}."}
    if kind == 2:
        value = rng.randrange(1, 10)
        big, small, factor = rng.choice(UNITS)
        return {
            "instruction": f"Convert {value} {big} to {small}.",
            "response": f"{value} {big} is {value * factor} {small}.",
        }
    if kind == 3:
        word = rng.choice(WORDS)
        return {
            "instruction": f"Spell the word '{word}' backwards.",
            "response": f"'{word}' backwards is '{word[::-1]}'.",
        }
    if kind == 4:
        word = rng.choice(list(OPPOSITES))
        return {
            "instruction": f"What is the opposite of '{word}'?",
            "response": f"The opposite of '{word}' is '{OPPOSITES[word]}'.",
        }
    if kind == 5:
        numbers = rng.sample(range(1, 50), 4)
        listed = ", ".join(map(str, numbers))
        return {
            "instruction": f"Sort these numbers from smallest to largest: {listed}.",
            "response": ", ".join(map(str, sorted(numbers))) + ".",
        }
    word = rng.choice(WORDS)
    return {
        "instruction": f"How many letters are in the word '{word}'?",
        "response": f"The word '{word}' has {len(word)} letters.",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("instructions.jsonl"))
    args = parser.parse_args()
    rng = random.Random(20261127)
    rows = [example(rng) for _ in range(args.count)]
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} examples to {args.out}")


if __name__ == "__main__":
    main()
