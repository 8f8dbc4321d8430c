"""Planned vs measured peak memory of one QLoRA training step.

    .venv/bin/python scripts/bench_memory.py                      # built-in model, seq 512 and 2048
    .venv/bin/python scripts/bench_memory.py --7b --seqs 512,2048 # adds a 7B-shaped 4-bit llama
    .venv/bin/python scripts/bench_memory.py --7b --seqs 2048 --checkpoint-only --7b-only

Each case runs in its own process so MLX's peak counter (mx.get_peak_memory) starts from zero.
The 7B-shaped llama is built from Llama-2-7B's config with random 4-bit weights (no download);
one step of it takes minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 4096, "tie_word_embeddings": False,
            "quantization": {"group_size": 64, "bits": 4}}


def make_7b(out: Path) -> Path:
    """A Llama-2-7B-shaped folder with random 4-bit weights, written without fp32 copies."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from tests.tiny import train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    args = llama.ModelArgs.from_dict(LLAMA_7B)
    model = llama.Model(args)  # lazy: nothing is allocated until evaluated
    nn.quantize(model, group_size=64, bits=4)
    weights = {}
    for name, p in tree_flatten(model.parameters()):
        if p.dtype == mx.uint32:
            weights[name] = mx.random.randint(0, 2**31, p.shape).astype(mx.uint32)
        elif name.endswith("scales"):
            weights[name] = mx.full(p.shape, 0.002, mx.float16)
        elif name.endswith("biases"):
            weights[name] = mx.full(p.shape, -0.015, mx.float16)
        else:
            weights[name] = mx.ones(p.shape, mx.float16)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    train_tokenizer(out)
    (out / "config.json").write_text(json.dumps(dict(LLAMA_7B, vocab_size=32000)))
    return out


def measure(model_dir: str, seq: int, checkpoint: bool, batch: int) -> dict:
    """One step in this process: (planned peak, measured peak) in bytes."""
    import mlx.core as mx

    from mlxtune.platform import available_memory, backend
    from mlxtune.train.config import load_train_config
    from mlxtune.train.lora import apply_lora
    from mlxtune.train.loop import train
    from mlxtune.train.memory import plan_memory
    from mlxtune.train.session import load_for_training

    config = load_train_config(None, [f"model={model_dir}", f"batch_size={batch}",
                                      f"max_seq_length={seq}", f"grad_checkpoint={checkpoint}",
                                      "num_layers=8", "lora_parameters.keys=[q_proj,v_proj]"])
    plan = plan_memory(Path(model_dir), config, backend(), available_memory())
    model = load_for_training(Path(model_dir), config)
    apply_lora(model, config)
    if checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    vocab = model.args.vocab_size
    inputs = mx.random.randint(0, vocab, (batch, seq))
    batch_item = (0, inputs, mx.roll(inputs, -1, 1), mx.ones((batch, seq)))
    import mlx.optimizers as optim

    mx.eval(model.parameters())
    mx.reset_peak_memory()
    train(model, optim.Adam(learning_rate=1e-5), iter([batch_item]), 1)
    return {"planned": plan.peak, "measured": mx.get_peak_memory()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", default="512,2048")
    parser.add_argument("--7b", dest="big", action="store_true", help="also the 7B-shaped llama")
    parser.add_argument("--7b-only", dest="only_big", action="store_true",
                        help="only the 7B-shaped llama (implies --7b)")
    parser.add_argument("--checkpoint-only", action="store_true",
                        help="only the cases with gradient checkpointing")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: model seq ckpt
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.one[2] == "1", args.batch)))
        return
    from mlxtune.models.resolve import resolve_model

    models = [] if args.only_big else [("smollm2-135m", str(resolve_model("smollm2-135m")))]
    with tempfile.TemporaryDirectory() as tmp:
        if args.big or args.only_big:
            models.append(("llama-7b-shaped 4-bit", str(make_7b(Path(tmp) / "llama7b"))))
        print(f"{'model':<24} {'seq':>5} {'checkpoint':>10} {'planned GB':>11} "
              f"{'measured GB':>12} {'plan/measured':>14}", flush=True)
        # Each step runs with what the mlxtune command gives itself: the fast BLAS and allocator.
        from mlxtune.blas import MARKER_VAR, blas_env

        env = {**os.environ, **blas_env()}
        env.pop(MARKER_VAR, None)
        for name, folder in models:
            for seq in map(int, args.seqs.split(",")):
                for ckpt in (True,) if args.checkpoint_only else (False, True):
                    out = subprocess.run([sys.executable, __file__, "--batch", str(args.batch),
                                          "--one", folder, str(seq), str(int(ckpt))],
                                         capture_output=True, text=True, env=env)
                    if out.returncode:
                        print(f"{name:<24} {seq:>5} {str(ckpt):>10}  failed: "
                              f"{out.stderr.strip().splitlines()[-1]}", flush=True)
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    print(f"{name:<24} {seq:>5} {str(ckpt):>10} {r['planned'] / 2**30:>11.2f} "
                          f"{r['measured'] / 2**30:>12.2f} {r['planned'] / r['measured']:>14.2f}",
                          flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
