"""Two tiny adapters with different trained answers, trained once per test session and shared by
the fuse and serve tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ANSWERS = {"json-bot": '{"ok": true}', "alpha-bot": "alpha bravo"}
_TRAINED: dict = {}


def write_data(folder: Path, answer: str, n_train: int = 32, n_valid: int = 8) -> Path:
    """Chat JSONL whose assistant always says `answer` (as tests/test_train.py writes it)."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["alpha", "bravo", "fox", "dog", "capital", "France", "quick", "lazy"]
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_valid)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                q = " ".join(rng.choice(words, 4))
                f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": answer}]}) + "\n")
    return folder


def train_adapter(folder: Path, model_dir: Path, answer: str, rank: int = 8) -> Path:
    """A LoRA run folder on `model_dir` that learned to answer `answer` (120 steps).

    At 5e-3 the 80-step run was chaotic: float-rounding differences (another exp, another
    summation order) moved its final loss anywhere from 1.55 to 2.6 and sometimes left the answer
    unlearned. At 3e-3, 120 steps reach the same 1.552 from every variant tried.
    """
    from mlxtune.train.run import run_training

    config = {"model": str(model_dir), "data": str(write_data(folder / "data", answer)),
              "adapter_path": str(folder / "run"), "batch_size": 4, "iters": 120,
              "learning_rate": 3e-3, "num_layers": -1, "mask_prompt": True,
              "steps_per_report": 20, "steps_per_eval": 120, "save_every": 120, "val_batches": 2,
              "lora_parameters": {"rank": rank, "scale": 2.0}}
    path = folder / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return run_training(path, say=lambda s: None).run_dir


def trained_adapters(root: Path, model_dir: Path) -> dict[str, Path]:
    """{name: run folder} for ANSWERS on `model_dir`, trained on the first call only."""
    key = str(model_dir)
    if key not in _TRAINED:
        _TRAINED[key] = {name: train_adapter(root / name, model_dir, answer)
                         for name, answer in ANSWERS.items()}
    return _TRAINED[key]
