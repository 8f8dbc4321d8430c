"""Tokens/s of one QLoRA job on 1 and on 2 ranks (mlx.launch, ring backend, loopback), and the
gradient traffic per step.

    .venv/bin/python scripts/bench_distributed.py [--model smollm2-135m] [--steps 6]

On one 2-core machine two ranks share the same cores, so expect no speed-up: this measures
correctness (same losses) and overhead. Across two Macs each rank gets its own chip.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = "alpha bravo charlie delta echo fox golf hotel india juliet kilo lima".split()


def write_data(folder: Path, n: int = 64) -> None:
    """A small deterministic chat dataset (answers are JSON) in mlx-lm's format."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("valid", 8)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(count):
                words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(6)]
                f.write(json.dumps({"messages": [
                    {"role": "user", "content": "List the words: " + " ".join(words)},
                    {"role": "assistant", "content": json.dumps({"words": words})}]}) + "\n")


def run(tmp: Path, model: str, steps: int, ranks: int, batch: int) -> dict:
    """Train `steps` steps on `ranks` processes with a global batch of `batch`; metrics back."""
    run_dir = tmp / f"run-{ranks}"
    config = {"model": model, "data": str(tmp / "data"), "adapter_path": str(run_dir),
              "batch_size": batch // ranks, "iters": steps, "num_layers": 8,
              "learning_rate": 1e-4, "steps_per_report": 1, "steps_per_eval": 10**6,
              "save_every": 10**6, "max_seq_length": 64, "keep_best": False,
              "lora_parameters": {"rank": 8, "keys": ["q_proj", "v_proj"]}}
    path = tmp / f"config-{ranks}.yaml"
    path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "mlxtune", "train", str(path)] + (["-n", str(ranks)]
                                                                   if ranks > 1 else [])
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train_loss" in r]
    timed = train[1:] or train  # the first step includes compilation
    adapters = (run_dir / "adapters.safetensors").stat().st_size
    return {"tokens_per_sec": sum(r["tokens_per_sec"] for r in timed) / len(timed),
            "first_loss": train[0]["train_loss"], "adapter_bytes": adapters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="global batch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_data(tmp / "data")
        one = run(tmp, args.model, args.steps, 1, args.batch)
        two = run(tmp, args.model, args.steps, 2, args.batch)
    # A ring all-reduce sends 2 (n-1)/n of the gradient bytes from each rank per step; the
    # gradients have the adapters' size (fp32).
    traffic = 2 * (2 - 1) / 2 * two["adapter_bytes"]
    print(f"model {args.model}, global batch {args.batch} x 64 tokens, LoRA r=8 on q/v of the "
          f"last 8 blocks, {args.steps} steps")
    print(f"{'ranks':>6} {'tokens/s':>10} {'first-step loss':>16}")
    for n, r in ((1, one), (2, two)):
        print(f"{n:>6} {r['tokens_per_sec']:>10.1f} {r['first_loss']:>16.6f}")
    print(f"2-rank / 1-rank tokens/s: {two['tokens_per_sec'] / one['tokens_per_sec']:.2f}x")
    print(f"first-step loss difference: {abs(one['first_loss'] - two['first_loss']):.2e}")
    print(f"gradient all-reduce per step: {two['adapter_bytes'] / 1e6:.2f} MB of gradients, "
          f"{traffic / 1e6:.2f} MB sent by each rank")


if __name__ == "__main__":
    main()
