"""A synthetic preference set for tests: the chosen answer always uses one set of words, the
rejected one another, so held-out pairs (new prompts, new word combinations) follow the same
rule and a tuned model can get them right only by learning it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PROMPT_WORDS = ["alpha", "bravo", "fox", "dog", "capital", "France", "quick", "lazy", "brown"]
GOOD = ["Paris", "quick", "fox", "name"]
BAD = ["lazy", "dog", "brown", "age"]


def write_pairs(folder: Path, n_train: int = 48, n_valid: int = 16, seed: int = 0) -> Path:
    """train/valid/test.jsonl of {"prompt": [user], "chosen": [assistant], "rejected": [...]}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_valid)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                prompt = " ".join(rng.choice(PROMPT_WORDS, 3))
                good, bad = " ".join(rng.choice(GOOD, 2)), " ".join(rng.choice(BAD, 2))
                f.write(json.dumps({"prompt": [{"role": "user", "content": prompt}],
                                    "chosen": [{"role": "assistant", "content": good}],
                                    "rejected": [{"role": "assistant", "content": bad}]}) + "\n")
    return folder


def pair_config(folder: Path, model_dir: Path, **extra) -> Path:
    """A DPO config.yaml in `folder` with pairs written beside it; `extra` overrides any key."""
    config = {"model": str(model_dir), "data": str(write_pairs(folder / "data")),
              "adapter_path": str(folder / "run"), "training_mode": "dpo", "batch_size": 4,
              "iters": 30, "learning_rate": 2e-3, "num_layers": -1, "steps_per_report": 1,
              "steps_per_eval": 30, "save_every": 10, "val_batches": -1,
              "lora_parameters": {"rank": 8, "scale": 2.0}, **extra}
    path = folder / "config.yaml"
    path.write_text(json.dumps(config))
    return path
