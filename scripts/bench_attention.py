#!/usr/bin/env python
"""Training attention on the CPU three ways, side by side: mlxtune's kernel pair
(kernels.attention_train and its gradient), the MLX-op attention cpu_math uses without it, and
MLX's own mx.fast.scaled_dot_product_attention.

    .venv/bin/python scripts/bench_attention.py              # SmolLM2's heads, 64-2048 tokens
    .venv/bin/python scripts/bench_attention.py --lengths 512,4096 --batch 1

SmolLM2-135M's shape: 9 query heads on 3 key/value heads of 64, causal. Each figure is the median
of repeated timed calls in one process; GFLOP/s counts the causal half of the products (forward:
QK^T and PV; forward + backward: 3.5x that).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from mlxtune import cpu_math, kernels  # noqa: E402

HEADS, KV_HEADS, DIM, SCALE = 9, 3, 64, 0.125


def _median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _ways(q, k, v, cotangent):
    """{name: (forward, forward + backward)} as functions of nothing."""
    def kernel(q, k, v):
        return cpu_math._attention_kernel_fn(SCALE, True)(q, k, v)[0]

    def ops(q, k, v):
        return cpu_math.attention_ops(q, k, v, SCALE, "causal")

    def fast(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask="causal")

    ways = {"mlxtune kernel": kernel, "MLX ops (cpu_math)": ops, "mx.fast sdpa": fast}
    return {name: (lambda f=f: f(q, k, v),
                   lambda f=f: mx.vjp(f, [q, k, v], [cotangent]))
            for name, f in ways.items()}


def _with_fast_blas() -> None:
    """Run again, once, with what the mlxtune command gives itself (the fast BLAS preloaded): under
    MLX's bundled reference BLAS the MLX-op ways would be ~40x slower than a user sees."""
    from mlxtune.blas import MARKER_VAR, blas_env

    env = {**os.environ, **blas_env()}
    if not os.environ.get(MARKER_VAR) and env.get(MARKER_VAR):
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)


def main() -> int:
    _with_fast_blas()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="64,256,1024,2048", help="comma list of sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    if kernels.attention_train is None:
        print(f"bench_attention: the kernels are not in use ({kernels.status()})")
        return 2
    from mlxtune.platform import chip_name

    print(f"causal attention, batch {args.batch}, {HEADS} heads on {KV_HEADS} key/value heads of "
          f"{DIM}, fp32; {chip_name()}")
    print(f"{'tokens':>6}  {'way':<20} {'forward ms':>11} {'GFLOP/s':>8} {'fwd+bwd ms':>11} "
          f"{'GFLOP/s':>8}")
    for n in (int(x) for x in args.lengths.split(",")):
        shape, kv = (args.batch, HEADS, n, DIM), (args.batch, KV_HEADS, n, DIM)
        q, cotangent = mx.random.normal(shape), mx.random.normal(shape)
        k, v = mx.random.normal(kv), mx.random.normal(kv)
        mx.eval(q, k, v, cotangent)
        gflop = 2 * args.batch * HEADS * n * n * DIM / 1e9  # the causal half of QK^T and PV
        times = {}
        for name, (forward, both) in _ways(q, k, v, cotangent).items():
            fwd, fb = _median_ms(forward, args.repeats), _median_ms(both, args.repeats)
            times[name] = fb
            print(f"{n:>6}  {name:<20} {fwd:11.2f} {gflop / fwd * 1e3:8.1f} {fb:11.2f} "
                  f"{3.5 * gflop / fb * 1e3:8.1f}")
        speedup = times["MLX ops (cpu_math)"] / times["mlxtune kernel"]
        print(f"{'':>6}  kernel vs MLX ops: {speedup:.1f}x faster forward + backward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
