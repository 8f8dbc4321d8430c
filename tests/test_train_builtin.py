"""QLoRA on the real built-in SmolLM2-135M (4-bit): validation loss falls and the answers change
to the trained format. Slow-marked; runs in CI.

What is asserted holds on any CPU: a five-fold fall of the loss, and an answer in the trained JSON
shape (not the exact values: those could differ with another BLAS kernel's rounding)."""

import json

import numpy as np
import pytest

from mlxtune.train.run import run_training

# A real model's training: rerun per compute variant (test.sh --variants).
pytestmark = pytest.mark.numerics

NAMES = ["Ada", "Bob", "Cyrus", "Dana", "Eve", "Farid", "Gita", "Hugo", "Ines", "Jamal"]
CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Rome", "Seoul"]


def _example(rng):
    name, age, city = rng.choice(NAMES), int(rng.integers(18, 90)), rng.choice(CITIES)
    return {"messages": [{"role": "user", "content": f"{name} is {age} years old and lives in "
                                                      f"{city}."},
                         {"role": "assistant",
                          "content": json.dumps({"name": name, "age": age, "city": city})}]}


@pytest.mark.slow
def test_qlora_on_the_builtin_model_learns_json_extraction(tmp_path, builtin_model_dir):
    from mlx_lm import generate
    from mlx_lm.utils import load_adapters

    from mlxtune.train.config import load_train_config
    from mlxtune.models.folder import load_tokenizer
    from mlxtune.train.session import load_for_training

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 64), ("valid", 12)):
        (data / f"{split}.jsonl").write_text(
            "".join(json.dumps(_example(rng)) + "\n" for _ in range(n)))
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "model": str(builtin_model_dir), "data": str(data), "adapter_path": str(tmp_path / "run"),
        "batch_size": 4, "iters": 12, "learning_rate": 1e-3, "num_layers": 8,
        "mask_prompt": True, "max_seq_length": 96, "steps_per_report": 4, "steps_per_eval": 12,
        "val_batches": -1, "lora_parameters": {"rank": 8, "alpha": 16, "keys": "all-linear"}}))
    result = run_training(config, say=lambda s: None)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert vals[-1] < 0.2 * vals[0]

    model = load_for_training(builtin_model_dir, load_train_config(None))
    tokenizer = load_tokenizer(builtin_model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Zoe is 41 years old and lives in Berlin."}],
        add_generation_prompt=True, tokenize=False)
    before = generate(model, tokenizer, prompt, max_tokens=30)
    load_adapters(model, str(result.run_dir))
    after = generate(model, tokenizer, prompt, max_tokens=30)
    answer = json.loads(after)
    assert set(answer) == {"name", "age", "city"} and isinstance(answer["age"], int)
    with pytest.raises(ValueError):
        json.loads(before)
