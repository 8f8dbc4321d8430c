"""Generate data/raw/people.json: the demo's dataset, deterministically (and, with --pairs,
data/raw/people_pairs.jsonl: preference pairs on the same task).

    .venv/bin/python scripts/make_data.py [--rows 480] [--seed 7]
    .venv/bin/python scripts/make_data.py --pairs [--rows 240] [--seed 11]

A structured-extraction task a small model gets wrong out of the box and learns in minutes: turn
a sentence about a person, in many phrasings, into one JSON object with fixed keys. Written in
Alpaca's export shape (instruction / input / output), so `mlxtune prepare` has real work to do.
Names, cities and jobs are drawn from short built-in lists; every row is synthetic.

The pairs (TRL's prompt / chosen / rejected strings) prefer the exact JSON with all four fields
to a worse answer of one of three kinds in turn: the JSON without the job, without the age, or
with a wrong city.
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


def _worse(fields: dict, kind: int, rng: random.Random) -> str:
    """An answer worse than the exact JSON: without the job, without the age, or with a wrong
    city. The first two are shorter, so the base model, summing log-probabilities over fewer
    tokens, tends to prefer them: the preference has to be learned."""
    if kind == 2:
        return json.dumps(dict(fields, city=rng.choice([c for c in CITIES
                                                        if c != fields["city"]])))
    drop = "job" if kind == 0 else "age"
    return json.dumps({k: v for k, v in fields.items() if k != drop})


def make_pairs(n: int, seed: int) -> list[dict]:
    """`n` preference rows: the exact JSON chosen, a worse answer rejected."""
    rng = random.Random(seed)
    pairs = []
    for i, row in enumerate(make_rows(n, seed)):
        fields = json.loads(row["output"])
        pairs.append({"prompt": f"{row['instruction']}\n\n{row['input']}",
                      "chosen": row["output"], "rejected": _worse(fields, i % 3, rng)})
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", action="store_true", help="Write preference pairs instead.")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    raw = Path(__file__).resolve().parent.parent / "data" / "raw"
    if args.pairs:
        out = args.out or raw / "people_pairs.jsonl"
        rows = make_pairs(args.rows or 240, 11 if args.seed is None else args.seed)
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        out = args.out or raw / "people.json"
        rows = make_rows(args.rows or 480, 7 if args.seed is None else args.seed)
        text = json.dumps(rows, indent=1) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
