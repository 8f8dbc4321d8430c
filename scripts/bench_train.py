#!/usr/bin/env python
"""One QLoRA training job three ways: mlxtune, stock mlx_lm.lora, PEFT on PyTorch CPU.

    .venv/bin/python scripts/bench_train.py            # the three legs (stock: 35+ min on 2 cores)
    .venv/bin/python scripts/bench_train.py --legs mlxtune,peft --rounds 3   # ~4 minutes
    .venv/bin/python scripts/bench_train.py --7b       # also: peak memory of a 7B-shaped step
    .venv/bin/python scripts/bench_train.py --legs mlxtune,peft --profile   # where time goes
    .venv/bin/python scripts/bench_train.py --legs mlxtune,peft --masked    # a masked prompt
    .venv/bin/python scripts/bench_train.py --legs mlxtune,peft --isa avx2  # an AVX2 CPU's race

Same job for every leg: the built-in 4-bit SmolLM2-135M, the same token batches (4 x 64,
generated deterministically and tokenized once here), LoRA rank 8 on q_proj and v_proj of the
last 8 layers, AdamW. `--masked` trains on the second half of each row only, as `mask_prompt`
does with a prompt (mlxtune skips the head for the masked half; PEFT computes the logits of every
token and ignores the masked ones). Each leg runs in its own process so its peak memory is its
own. PEFT needs the bench extra: `.venv/bin/pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_profile  # noqa: E402  (scripts/, beside this file)

BATCH, SEQ, RANK, LAYERS, KEYS, SCALE, LR = 4, 64, 8, 8, ["q_proj", "v_proj"], 20.0, 1e-5
# The leading targets of each row that carry no loss (--masked sets SEQ // 2, in every process).
PROMPT = 0
# --isa avx2: every leg's code held to AVX2 + FMA on a bigger CPU (an AVX2 machine's race on an
# AVX-512 one): mlxtune's kernels, OpenBLAS's core type, PyTorch's ATen and its MKL.
ISA_ENV = {"avx2": {"MLXTUNE_CPU_ISA": "avx2", "OPENBLAS_CORETYPE": "Haswell",
                    "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
ISA = None
_SUBJECTS = ["the sea", "a lighthouse", "bread", "a bicycle", "winter", "prime numbers", "bees",
             "the moon", "a library", "coffee", "rivers", "chess", "volcanoes", "a violin"]
_ASKS = ["Write two sentences about {}.", "Explain {} to a child.", "Give three facts about {}.",
         "What is surprising about {}?", "Describe {} in the style of a weather report."]


def make_tokens(n_rows: int, seed: int = 0) -> list[list[int]]:
    """`n_rows` rows of SEQ + 1 token ids: fixed chat examples, chat-templated and packed."""
    from mlx_lm.utils import load_tokenizer

    from mlxtune.models.resolve import resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m"))
    rng = random.Random(seed)
    stream: list[int] = []
    while len(stream) < n_rows * (SEQ + 1):
        subject = rng.choice(_SUBJECTS)
        answer = " ".join(f"{subject.capitalize()} is {rng.choice(['old', 'bright', 'quiet', 'vast'])}"
                          f" and {rng.choice(['useful', 'strange', 'calm', 'loud'])}."
                          for _ in range(rng.randint(2, 5)))
        messages = [{"role": "user", "content": rng.choice(_ASKS).format(subject)},
                    {"role": "assistant", "content": answer}]
        stream += tok.apply_chat_template(messages, tokenize=True)
    return [stream[i * (SEQ + 1):(i + 1) * (SEQ + 1)] for i in range(n_rows)]


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _time_steps(step, batches, warmup: int) -> dict:
    """Run `step(batch) -> loss` over batches; time all after `warmup`."""
    losses, start = [], None
    for i, batch in enumerate(batches):
        if i == warmup:
            bench_profile.switch(True)
            start = time.perf_counter()
        tick = time.perf_counter()
        losses.append(step(batch))
        print(f"  step {i + 1}/{len(batches)}: loss {losses[-1]:.4f}, "
              f"{time.perf_counter() - tick:.2f} s", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    bench_profile.switch(False)
    timed = len(batches) - warmup
    return {"losses": losses, "s_per_step": seconds / timed,
            "tokens_per_s": timed * BATCH * SEQ / seconds}


def _mlx_model():
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from mlxtune.models.resolve import resolve_model

    model, _ = load(str(resolve_model("smollm2-135m")))
    model.freeze()
    mx.random.seed(0)
    linear_to_lora_layers(model, LAYERS, {"rank": RANK, "scale": SCALE, "dropout": 0.0,
                                          "keys": [f"self_attn.{k}" for k in KEYS]})
    return model


def leg_mlxtune(rows, warmup: int, cached: bool = False) -> dict:
    """mlxtune's own code path: load_for_training (the CPU fast path), apply_lora, and the
    compiled step of mlxtune.train.loop.train, on the same batches, rank, keys and optimizer.
    `cached`: the same job as a second epoch with train.cache_frozen_layers (the rows repeat, the
    first pass is the untimed warm-up and fills the cache)."""
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlxtune.models.resolve import resolve_model
    from mlxtune.train.config import load_train_config
    from mlxtune.train.lora import apply_lora
    from mlxtune.train.loop import train
    from mlxtune.train.session import load_for_training

    config = load_train_config(None, [
        f"num_layers={LAYERS}", f"lora_parameters.rank={RANK}", f"lora_parameters.scale={SCALE}",
        f"lora_parameters.keys=[{','.join(KEYS)}]", "optimizer=adamw", f"learning_rate={LR}"])
    model = load_for_training(resolve_model("smollm2-135m"), config)
    apply_lora(model, config)
    optimizer = optim.AdamW(learning_rate=LR)
    batches = [mx.array(rows[i:i + BATCH]) for i in range(0, len(rows), BATCH)]
    if cached:
        batches = batches + batches
    # The loss counts every target past the first PROMPT of a row (all of them by default).
    mask = mx.broadcast_to((mx.arange(SEQ) >= PROMPT).astype(mx.float32), (BATCH, SEQ))
    stream = ((i, b[:, :-1], b[:, 1:], mask) for i, b in enumerate(batches))
    if cached:
        from mlxtune.train.frozen_prefix import FrozenPrefix

        stream = FrozenPrefix(model, max_bytes=1 << 30).batches(stream)
    losses, ticks = [], [time.perf_counter()]

    def on_step(step, loss, ntoks, stats=None):
        losses.append(loss)
        ticks.append(time.perf_counter())
        print(f"  step {step}/{len(batches)}: loss {loss:.4f}, {ticks[-1] - ticks[-2]:.2f} s",
              file=sys.stderr, flush=True)
        if step == warmup:  # perf counts the timed steps only
            bench_profile.switch(True)
            ticks[-1] = time.perf_counter()

    mx.reset_peak_memory()
    if warmup == 0:
        bench_profile.switch(True)
    train(model, optimizer, stream, len(batches), on_step=on_step)
    bench_profile.switch(False)
    seconds = ticks[-1] - ticks[warmup]
    timed = len(batches) - warmup
    return {"losses": losses, "s_per_step": seconds / timed,
            "tokens_per_s": timed * BATCH * SEQ / seconds,
            "peak_gb": mx.get_peak_memory() / 2**30, "rss_gb": _rss_gb()}


def leg_mlx_lm(rows, warmup: int) -> dict:
    """Stock mlx-lm: its load, LoRA layers, default loss and step, no mlxtune code in the math."""
    return _mlx_leg(rows, warmup)


def _mlx_leg(rows, warmup: int) -> dict:
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss

    model = _mlx_model()
    optimizer = optim.AdamW(learning_rate=LR)
    state = [model.state, optimizer.state]
    loss_and_grad = nn.value_and_grad(model, default_loss)

    # The same shape as mlx_lm.tuner.trainer.train's step (no accumulation).
    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (loss, _), grad = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grad)
        return loss

    # Targets PROMPT + 1 .. SEQ count (mlx-lm numbers a row's targets from 1).
    lengths = mx.array([[PROMPT + 1, SEQ]] * BATCH)
    batches = [mx.array(rows[i:i + BATCH]) for i in range(0, len(rows), BATCH)]
    model.train()
    mx.reset_peak_memory()

    def run(batch):
        loss = step(batch, lengths)
        mx.eval(state, loss)
        return loss.item()

    out = _time_steps(run, batches, warmup)
    out.update(peak_gb=mx.get_peak_memory() / 2**30, rss_gb=_rss_gb())
    return out


def leg_peft(rows, warmup: int) -> dict:
    """PEFT on PyTorch CPU: the same GGUF through transformers (de-quantized fp32), LoRA, AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mlxtune.models.builtin import builtin_gguf

    gguf = builtin_gguf("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 torch_dtype=torch.float32)
    n = model.config.num_hidden_layers
    config = LoraConfig(r=RANK, lora_alpha=SCALE * RANK, lora_dropout=0.0, target_modules=KEYS,
                        layers_to_transform=list(range(n - LAYERS, n)))
    model = get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    batches = [torch.tensor(rows[i:i + BATCH]) for i in range(0, len(rows), BATCH)]

    def run(batch):
        # labels = inputs: transformers shifts them, so the same SEQ targets per row count, less
        # the first PROMPT (-100: ignored).
        labels = batch.clone()
        labels[:, 1:PROMPT + 1] = -100
        loss = model(input_ids=batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    out = _time_steps(run, batches, warmup)
    out.update(peak_gb=None, rss_gb=_rss_gb(), threads=torch.get_num_threads())
    return out


LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
             "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "rms_norm_eps": 1e-5, "vocab_size": 32000, "rope_theta": 10000.0,
             "max_position_embeddings": 4096, "tie_word_embeddings": False}


def random_quantized_llama(config: dict, group_size: int = 32, bits: int = 4):
    """A llama from `config` with random packed weights, never materializing fp32 weights."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama

    # MLX is lazy: the fp32 init and its quantization are graphs that are dropped, never run.
    model = llama.Model(llama.ModelArgs.from_dict(config))
    nn.quantize(model, group_size, bits)
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            rows, cols = m.weight.shape
            m.weight = mx.random.randint(-2**31, 2**31 - 1, (rows, cols)).view(mx.uint32)
            in_dims = cols * 32 // bits
            # Uniform values around 0 with a spread like 1/sqrt(hidden): logits stay finite.
            m.scales = mx.full((rows, in_dims // group_size), 0.3 / in_dims ** 0.5 / 2 ** bits,
                               dtype=mx.float16)
            m.biases = -(2 ** (bits - 1)) * m.scales
    model.set_dtype(mx.float16, lambda d: d == mx.float32)  # norms stored fp16 as a 4-bit model's
    mx.eval(model.parameters())
    return model


def leg_7b(batch: int = 1, seq: int = 512) -> dict:
    """Peak memory and time of one QLoRA step of a 7B-shaped llama with random 4-bit weights,
    through mlxtune's own CPU path and loss (the fused output cross-entropy)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlxtune.fastpath import prepare_for_training
    from mlxtune.train.loop import masked_loss

    model = random_quantized_llama(LLAMA2_7B)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    model.freeze()
    linear_to_lora_layers(model, LAYERS, {"rank": RANK, "scale": SCALE, "dropout": 0.0,
                                          "keys": [f"self_attn.{k}" for k in KEYS]})
    prepare_for_training(model)
    model.train()
    optimizer = optim.AdamW(learning_rate=LR)
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    tokens = mx.random.randint(0, LLAMA2_7B["vocab_size"], (batch, seq + 1))
    mask = mx.ones((batch, seq))
    mx.eval(tokens, mask, model.parameters())
    mx.reset_peak_memory()
    start = time.perf_counter()
    (loss, _), grad = loss_and_grad(model, tokens[:, :-1], tokens[:, 1:], mask)
    optimizer.update(model, grad)
    mx.eval(loss, model.parameters(), optimizer.state)
    return {"seconds": time.perf_counter() - start, "peak_gb": mx.get_peak_memory() / 2**30,
            "rss_gb": _rss_gb(), "weights_gb": weights / 2**30, "loss": loss.item(),
            "lora_layers": LAYERS, "seq": seq}


LEGS = {"mlxtune": leg_mlxtune, "mlx_lm": leg_mlx_lm, "mlx_lm+openblas": leg_mlx_lm,
        "peft": leg_peft, "mlxtune+cache": lambda rows, warmup: leg_mlxtune(rows, warmup, True)}


def _leg_env(name: str) -> dict:
    """The environment a user of that tool gets: mlxtune's fast BLAS, or stock MLX's own."""
    from mlxtune.blas import ALLOCATOR_ENV, blas_env, without_preload

    # Whatever this shell had loaded (OpenBLAS or MKL and its search path) goes; each leg gets its own.
    env = {k: v for k, v in without_preload().items()
           if k not in ("LD_LIBRARY_PATH", *ALLOCATOR_ENV)}
    env.update(ISA_ENV.get(ISA, {}))
    if name in ("mlxtune", "mlxtune+cache", "mlx_lm+openblas", "7b"):
        env.update(blas_env(env))
    return env


def _run_leg(name: str, data: Path, warmup: int, profile: bool = False) -> dict | None:
    """One leg in its own process (under perf when profiling); its result dict."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        cmd = [sys.executable, __file__, "--leg", name, "--data", str(data),
               "--warmup", str(warmup), "--result", str(out), "--batch", str(BATCH),
               "--seq", str(SEQ),
               *(["--masked"] if PROMPT else [])]
        env = _leg_env(name)
        if profile:
            cmd, env, perf_data = bench_profile.profiled(cmd, env, Path(scratch))
        print(f"bench: running {name} ...", flush=True)
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            print(f"bench: {name} failed (exit {proc.returncode})", flush=True)
            return None
        result = json.loads(out.read_text())
        if profile:
            steps = len(result["losses"]) - warmup
            result["profile"] = bench_profile.breakdown(perf_data, steps)
        return result


def _step_gflop() -> float:
    from mlxtune.models.resolve import resolve_model

    config = json.loads((resolve_model("smollm2-135m") / "config.json").read_text())
    return bench_profile.step_gflop(config, BATCH, SEQ, LAYERS)


def _blas_peaks(legs: list[str]) -> dict[str, float | None]:
    """Each framework's BLAS peak here, measured with the environment its leg runs in."""
    peaks = {"MLX with mlxtune's BLAS": bench_profile.blas_peak(_leg_env("mlxtune"),
                                                                sys.executable)}
    if "peft" in legs:
        peaks["PyTorch"] = bench_profile.blas_peak(_leg_env("peft"), sys.executable, "torch")
    return peaks


def _median_run(runs: list[dict | None]) -> dict | None:
    """The run with the median tokens/s of a leg's rounds (None if any failed)."""
    if not runs or any(r is None for r in runs):
        return None
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main() -> int:
    """Run the legs, each in a subprocess, and print the table and ratios."""
    global PROMPT, BATCH, SEQ, ISA
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps (fast legs)")
    # A stock step takes minutes here (fp16 quantized matmuls, reference BLAS), so one step,
    # timed with its compile: a few seconds' error on minutes.
    p.add_argument("--stock-steps", type=int, default=1, help="timed steps of stock mlx_lm")
    p.add_argument("--stock-warmup", type=int, default=0, help="untimed steps of stock mlx_lm")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (fast legs)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the fast legs this many times, alternating; report each leg's median")
    p.add_argument("--legs", default="mlxtune,mlx_lm,peft",
                   help="comma list of mlxtune, mlxtune+cache (a second epoch with "
                        "cache_frozen_layers), mlx_lm, mlx_lm+openblas, peft")
    p.add_argument("--7b", dest="seven_b", action="store_true",
                   help="also one QLoRA step of a 7B-shaped llama at batch 1 x 512 (minutes)")
    p.add_argument("--profile", action="store_true",
                   help="also sample the timed steps with perf: where each leg's time goes")
    p.add_argument("--masked", action="store_true",
                   help="the loss on the second half of each row only (a masked prompt)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"rows a step (default {BATCH})")
    p.add_argument("--seq", type=int, default=SEQ,
                   help=f"tokens a row (default {SEQ}; attention's share grows with it)")
    p.add_argument("--isa", choices=sorted(ISA_ENV),
                   help="hold every leg to this instruction set (avx2: an AVX2 CPU's race)")
    p.add_argument("--leg", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    BATCH, SEQ, ISA = args.batch, args.seq, args.isa
    PROMPT = SEQ // 2 if args.masked else 0

    if args.leg:  # inside one leg's process
        if args.leg == "7b":
            result = leg_7b()
        else:
            rows = json.loads(Path(args.data).read_text())
            result = LEGS[args.leg](rows, args.warmup)
        Path(args.result).write_text(json.dumps(result))
        return 0

    legs = [leg for leg in args.legs.split(",") if leg]
    runs = {name: [] for name in legs}
    if args.profile and (why := bench_profile.perf_available()):
        print(f"bench: --profile ignored: {why}")
        args.profile = False
    with tempfile.TemporaryDirectory() as tmp:
        # Fast legs alternate round by round, so a slow spell of a shared machine hits both.
        for round_ in range(args.rounds):
            for name in legs:
                stock = name.startswith("mlx_lm")
                if stock and round_ > 0:
                    continue
                warmup = args.stock_warmup if stock else args.warmup
                steps = args.stock_steps if stock else args.steps
                data = Path(tmp) / f"{name}.json"
                if name == "mlxtune+cache":  # the first epoch is the warm-up, the second timed
                    data.write_text(json.dumps(make_tokens(steps * BATCH)))
                    warmup = steps
                else:
                    data.write_text(json.dumps(make_tokens((warmup + steps) * BATCH)))
                runs[name].append(_run_leg(name, data, warmup, args.profile and not stock))
        results = {name: _median_run(r) for name, r in runs.items()}
        if args.seven_b:
            results["7b"] = _run_leg("7b", Path(tmp) / "none", 0)

    from mlxtune.platform import chip_name

    gflop, peaks = _step_gflop(), _blas_peaks(legs)
    print(f"\nQLoRA, built-in SmolLM2-135M 4-bit, batch {BATCH} x {SEQ}, rank {RANK}, "
          f"{'+'.join(KEYS)} of the last {LAYERS} layers, AdamW; {os.cpu_count()} cores, "
          f"{chip_name()}" + (f" held to {ISA.upper()}" if ISA else "")
          + (f"; loss on the last {SEQ - PROMPT} of each row's {SEQ} targets" if PROMPT else ""))
    print(f"one step is {gflop:.1f} GFLOP{' (all targets: GFLOP/s counts that)' if PROMPT else ''}"
          f"; BLAS peak (1024^3 fp32 matmul): " + ", ".join(
        f"{k} {_fmt(v, '.0f')} GFLOP/s" for k, v in peaks.items()))
    print(f"{'leg':>16} {'tokens/s':>9} {'s/step':>8} {'GFLOP/s':>8} {'peak GB':>8} "
          f"{'max RSS GB':>10}  first losses"
          + (f"   (median of {args.rounds} rounds)" if args.rounds > 1 else ""))
    for name in legs:
        r = results[name]
        if r is None:
            print(f"{name:>16}  failed")
            continue
        losses = " ".join(f"{x:.4f}" for x in r["losses"][:3])
        print(f"{name:>16} {r['tokens_per_s']:9.1f} {r['s_per_step']:8.2f} "
              f"{gflop / r['s_per_step']:8.1f} "
              f"{_fmt(r['peak_gb'], '8.2f'):>8} {r['rss_gb']:10.2f}  {losses}")
    for mine in ("mlxtune", "mlxtune+cache"):
        fast = results.get(mine)
        for other in ("mlx_lm", "mlx_lm+openblas", "peft"):
            if fast and results.get(other):
                o = results[other]
                print(f"{mine} / {other}: {fast['tokens_per_s'] / o['tokens_per_s']:.2f}x "
                      f"tokens/s, {fast['rss_gb'] / o['rss_gb']:.2f}x max RSS")
                pairs = [(a, b) for a, b in zip(runs[mine], runs[other]) if a and b]
                if len(pairs) > 1:
                    print("  per round (side by side): " + ", ".join(
                        f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x" for a, b in pairs))
    for name in legs:
        if results[name] and "profile" in results[name]:
            print("\n" + bench_profile.format_breakdown(name, results[name]["profile"],
                                                        results[name]["s_per_step"]))
    if args.seven_b and results.get("7b"):
        r = results["7b"]
        print(f"\n7B-shaped llama, random 4-bit weights ({r['weights_gb']:.2f} GB), LoRA on "
              f"{r['lora_layers']} layers, batch 1 x {r['seq']}: one step {r['seconds']:.0f} s, "
              f"peak {r['peak_gb']:.2f} GB (MLX), max RSS {r['rss_gb']:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
