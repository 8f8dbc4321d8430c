"""Adapters that give a known answer, built deterministically instead of trained.

A trained "answers X" adapter is a chaotic fixture: float rounding alone (another OpenBLAS kernel,
another exp) moved a short run's final loss from 1.55 to 2.6 and left the answer unlearned on one
CPU but not another. Here the LoRA weights are solved for in closed form, so every CPU gets the
same answer by a wide logit margin, and `build_adapter` checks that margin before any test uses it.

How: the adapter is a LoRA pair on the last block's `mlp.down_proj`, whose output is added to the
residual stream just before the final norm and the output head, so it changes only the next-token
prediction (no layer's keys or values). For every position where the answer is to be produced
(the prompt's last token, then each answer token) we record that layer's input and ask the pair to
add a vector many times the residual's size pointing along the head row of the token that must come
next; after the final RMSNorm that token's logit wins. A ridge least-squares fit over many prompts
gives the map, truncated to the rank by SVD.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Each answer is at most 7 distinct tokens with its end token (the tiny tokenizer's), so a rank-8
# pair can point every step at its own head row.
ANSWERS = {"json-bot": '{"age": 36}', "fox-bot": "quick fox"}
WORDS = ["alpha", "bravo", "fox", "dog", "capital", "France", "quick", "lazy", "brown"]
# Prompts tests ask besides the data files' own (fit and checked like them).
EXTRA_PROMPTS = ["quick brown fox", "lazy dog France", "alpha capital fox"]
KEYS = ["mlp.down_proj"]
MIN_MARGIN = 1.0  # logits between the wanted token and the runner-up, at every checked position
_BUILT: dict = {}


def write_data(folder: Path, answer: str, n_train: int = 32, n_valid: int = 8) -> Path:
    """Chat JSONL (train/valid/test) whose assistant always says `answer` to four random words."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_valid)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                q = " ".join(rng.choice(WORDS[:8], 4))
                f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": answer}]}) + "\n")
    return folder


def train_config(folder: Path, model_dir: Path, answer: str = ANSWERS["json-bot"],
                 **extra) -> Path:
    """A training config.yaml in `folder` (data written beside it): a small LoRA run on every
    block; `extra` overrides any key. At 2e-3 the run is stable: every compute variant lands on
    the same losses (at 5e-3 the final loss depended on the BLAS kernel)."""
    config = {"model": str(model_dir), "data": str(write_data(folder / "data", answer)),
              "adapter_path": str(folder / "run"), "batch_size": 4, "iters": 40,
              "learning_rate": 2e-3, "num_layers": -1, "mask_prompt": True,
              "steps_per_report": 5, "steps_per_eval": 20, "save_every": 10, "val_batches": -1,
              "lora_parameters": {"rank": 8, "scale": 2.0}, **extra}
    path = folder / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def data_prompts(folder: Path) -> list[str]:
    """The user turns of every example in a write_data folder."""
    return [json.loads(line)["messages"][0]["content"]
            for split in ("train", "valid", "test")
            for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def _chains(tok, prompts: list[str], answer: str) -> list[tuple[list[int], int]]:
    """(tokens, first answer position) per prompt: the chat prompt, the answer, the end token."""
    answer_ids = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
    out = []
    for p in prompts:
        prompt = tok.apply_chat_template([{"role": "user", "content": p}],
                                         add_generation_prompt=True)
        out.append((list(prompt) + answer_ids, len(prompt)))
    return out


class _Recorder:
    """Wraps a module's call to keep its inputs (MLX modules are called, not hooked)."""

    def __init__(self, module):
        self.module, self.seen = module, []

    def __call__(self, x):
        self.seen.append(x)
        return self.module(x)


def _features(model, chains) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs of the last block's down_proj and the residual before the final norm at each answer
    position, and the token that must follow there."""
    import mlx.core as mx

    mlp, inner = model.layers[-1].mlp, model.layers[-1].mlp.down_proj
    mlp.down_proj = rec = _Recorder(inner)
    norm = model.model.norm
    model.model.norm = res = _Recorder(norm)
    try:
        xs, hs, targets = [], [], []
        for tokens, start in chains:
            rec.seen.clear()
            res.seen.clear()
            mx.eval(model(mx.array(tokens)[None]))
            span = slice(start - 1, len(tokens) - 1)
            xs.append(np.array(rec.seen[0][0, span].astype(mx.float32)))
            hs.append(np.array(res.seen[0][0, span].astype(mx.float32)))
            targets.extend(tokens[start:])
    finally:
        mlp.down_proj, model.model.norm = inner, norm
    return np.concatenate(xs), np.concatenate(hs), np.array(targets)


def _head_rows(model) -> np.ndarray:
    """The output head as a float (vocab x hidden) matrix, de-quantized if it is stored packed."""
    import mlx.core as mx

    head = model.model.embed_tokens if model.args.tie_word_embeddings else model.lm_head
    if hasattr(head, "scales"):
        w = mx.dequantize(head.weight, head.scales, head.get("biases"), head.group_size,
                          head.bits)
    else:
        w = head.weight
    return np.array(w.astype(mx.float32), dtype=np.float64)


def solve_lora(model, chains, rank: int, scale: float) -> dict:
    """LoRA weights (lora_a, lora_b) for the last block's down_proj that make each chain's answer
    the greedy continuation (see the module docstring)."""
    x, h, targets = _features(model, chains)
    head = _head_rows(model)
    gain = np.array(model.model.norm.weight, dtype=np.float64)
    # After RMSNorm the residual's direction is what counts: point it along the wanted head row
    # (through the norm's gain), 30x longer than anything the model put there.
    directions = head[targets] / gain
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    y = directions * 30 * np.linalg.norm(h, axis=1).max()
    x64 = x.astype(np.float64)
    ridge = 1e-3 * np.trace(x64.T @ x64) / x64.shape[1]
    w = np.linalg.solve(x64.T @ x64 + ridge * np.eye(x64.shape[1]), x64.T @ y)  # (in, out)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    root = np.sqrt(s[:rank])
    a = u[:, :rank] * root  # (in, rank)
    b = (root[:, None] * vt[:rank]) / scale  # (rank, out)
    return {"lora_a": a.astype(np.float32), "lora_b": b.astype(np.float32)}


def answer_margins(model, tok, prompts: list[str], answer: str) -> np.ndarray:
    """For each answer position of each prompt (teacher-forced): the wanted token's logit minus
    the best other token's. All positive means greedy decoding gives `answer` and then stops."""
    import mlx.core as mx

    margins = []
    for tokens, start in _chains(tok, prompts, answer):
        logits = np.array(model(mx.array(tokens)[None])[0, start - 1:len(tokens) - 1]
                          .astype(mx.float32))
        want = np.array(tokens[start:])
        wanted = logits[np.arange(len(want)), want]
        logits[np.arange(len(want)), want] = -np.inf
        margins.append(wanted - logits.max(axis=1))
    return np.concatenate(margins)


def build_adapter(folder: Path, model_dir: Path, answer: str, rank: int = 8,
                  scale: float = 2.0) -> Path:
    """A run folder (adapter, adapter_config.json, config.yaml, data) on `model_dir` whose greedy
    answer to the data's prompts and EXTRA_PROMPTS is `answer`, checked by logits first."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.utils import load_adapters

    folder = Path(folder)
    data = write_data(folder / "data", answer)
    prompts = data_prompts(data) + EXTRA_PROMPTS
    # More prompts than the tests ask, so the map holds for any four words, not only these.
    rng = np.random.default_rng(1)
    fit = prompts + [" ".join(rng.choice(WORDS, 4)) for _ in range(96)]
    model, tok = load(str(model_dir))
    pair = solve_lora(model, _chains(tok, fit, answer), rank, scale)
    layer = len(model.layers) - 1
    run = folder / "run"
    run.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(run / "adapters.safetensors"),
                        {f"model.layers.{layer}.mlp.down_proj.{k}": mx.array(v)
                         for k, v in pair.items()})
    (run / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 1, "model": str(model_dir),
         "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": KEYS}}))
    (run / "config.yaml").write_text(json.dumps({"model": str(model_dir), "data": str(data)}))
    # Checked as stock mlx-lm loads it, on every prompt a test asks and on fresh ones.
    load_adapters(model, str(run))
    fresh = [" ".join(rng.choice(WORDS, 4)) for _ in range(16)]
    margins = answer_margins(model, tok, prompts + fresh, answer)
    if margins.min() < MIN_MARGIN:
        raise AssertionError(f"the built {answer!r} adapter wins by only {margins.min():.2f} "
                             f"logits somewhere (want >= {MIN_MARGIN})")
    return run


def answer_adapters(root: Path, model_dir: Path) -> dict[str, Path]:
    """{name: run folder} answering ANSWERS on `model_dir`, built on the first call only."""
    key = str(model_dir)
    if key not in _BUILT:
        _BUILT[key] = {name: build_adapter(Path(root) / name, model_dir, answer)
                       for name, answer in ANSWERS.items()}
    return _BUILT[key]
