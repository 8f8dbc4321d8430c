"""Generate data/raw/people.json: the demo's dataset, deterministically.

    .venv/bin/python scripts/make_data.py [--rows 480] [--seed 7]

A structured-extraction task a small model gets wrong out of the box and learns in minutes: turn
a sentence about a person, in many phrasings, into one JSON object with fixed keys. Written in
Alpaca's export shape (instruction / input / output), so `mlxtune prepare` has real work to do.
Names, cities and jobs are drawn from short built-in lists; every row is synthetic.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Ada", "Bruno", "Chen", "Dalia", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Jia",
         "Kofi", "Leila", "Mateo", "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Sami", "Tomas",
         "Uma", "Viktor", "Wen", "Ximena", "Yusuf", "Zara"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Lima", "Krakow", "Austin", "Hanoi", "Porto", "Accra",
          "Tbilisi", "Quito", "Bergen", "Cork", "Dakar", "Perth", "Turin"]
JOBS = ["nurse", "baker", "pilot", "teacher", "welder", "architect", "chemist", "librarian",
        "plumber", "translator", "farmer", "dentist", "journalist", "carpenter", "cook"]
TEMPLATES = [
    "{name} is a {age}-year-old {job} from {city}.",
    "Meet {name}, {age}, who works as a {job} in {city}.",
    "{city} is home to {name}, a {job} aged {age}.",
    "At {age}, {name} has been a {job} in {city} for years.",
    "Our new {job}, {name} ({age}), just moved to {city}.",
    "{name} lives in {city}. {name} is {age} and works as a {job}.",
    "Profile: {name}; occupation {job}; based in {city}; age {age}.",
    "The {job} {name}, {age} years old, was born and raised in {city}.",
]
INSTRUCTION = "Extract the person's name, age, city and job as JSON."


def make_rows(n: int, seed: int) -> list[dict]:
    """`n` distinct Alpaca rows from a seeded generator."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        fields = {"name": rng.choice(NAMES), "age": rng.randint(19, 78),
                  "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
        text = rng.choice(TEMPLATES).format(**fields)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"instruction": INSTRUCTION, "input": text, "output": json.dumps(fields)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=480)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent
                        / "data" / "raw" / "people.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(make_rows(args.rows, args.seed), indent=1) + "\n")
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
