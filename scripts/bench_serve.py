"""mlxtune serve vs stock mlx_lm.server on the same model, in one run, on loopback.

    python scripts/bench_serve.py [--model smollm2-135m] [--max-tokens 64] [--concurrency 8]

Each server runs alone in a subprocess (one at a time, so they never share the CPU), with the same
environment (the fast BLAS preload included). Measured with the openai client, streaming:
time to first token and generation tokens/s for one request, aggregate tokens/s for N concurrent
requests, and the adapter-switch cost (mlxtune: another adapter per request; mlx_lm.server: the
request's `adapters` field, which reloads the model). Adapters are random rank-8 LoRA weights on
every linear layer: a switch costs the same whatever the weights learned.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a cat."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A rank-8 LoRA adapter in mlx-lm's format with random (non-zero) weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    model.freeze()
    params = {"rank": 8, "scale": 2.0, "dropout": 0.0}
    linear_to_lora_layers(model, len(model.layers), params)
    mx.random.seed(seed)
    weights = {k: (mx.random.normal(v.shape) * 0.01).astype(mx.float32)
               for k, v in tree_flatten(model.trainable_parameters())}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": len(model.layers), "lora_parameters": params,
         "model": str(model_dir)}))
    return out


def start(cmd: list[str], port: int, env: dict) -> subprocess.Popen:
    """Start a server and wait (at most 10 minutes) until /v1/models answers."""
    import urllib.request

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[:4]} exited: {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{cmd[:4]} did not start in 10 minutes")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def one(client, model: str, max_tokens: int, extra: dict | None = None) -> dict:
    """Stream one chat completion: time to first token, tokens, generation tokens/s."""
    t0 = time.perf_counter()
    first, n = None, 0
    stream = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=max_tokens,
                                            temperature=0, stream=True, extra_body=extra or {})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            n += 1  # both servers send one chunk per token
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - t0, "tokens": n, "end": end - t0,
            "gen_tps": (n - 1) / (end - first) if n > 1 and end > first else 0.0}


def measure(base_url: str, model: str, max_tokens: int, concurrency: int, repeats: int,
            single_only: bool = False) -> dict:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    one(client, model, 8)  # warm-up: compile, caches
    singles = [one(client, model, max_tokens) for _ in range(repeats)]
    # Printed as it goes: a slow server's first numbers are seen even if a later phase is cut.
    print(json.dumps({"url": base_url, "ttft_1": statistics.median(r["ttft"] for r in singles),
                      "tps_1": statistics.median(r["gen_tps"] for r in singles)}), flush=True)
    if single_only:
        return {"ttft_1": statistics.median(r["ttft"] for r in singles),
                "tps_1": statistics.median(r["gen_tps"] for r in singles),
                "ttft_n": None, "tps_n": None, "switch": None}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda _: one(client, model, max_tokens), range(concurrency)))
    wall = time.perf_counter() - t0
    return {"ttft_1": statistics.median(r["ttft"] for r in singles),
            "tps_1": statistics.median(r["gen_tps"] for r in singles),
            "ttft_n": statistics.mean(r["ttft"] for r in runs),
            "tps_n": sum(r["tokens"] for r in runs) / wall}


def switch_cost(base_url: str, names: list[str], request=None, rounds: int = 3) -> float:
    """Extra seconds a 1-token request takes when it uses another adapter than the last one;
    `request(name)` gives the (model, extra body) that asks for adapter `name`."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    request = request or (lambda name: (name, None))
    same, switched = [], []
    for _ in range(rounds):
        for name in names:
            switched.append(one(client, *request(name)[:1], 1, request(name)[1])["end"])
            same.append(one(client, *request(name)[:1], 1, request(name)[1])["end"])
    return statistics.median(switched) - statistics.median(same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    # Stock mlx_lm.server on a Linux CPU batches through MLX's fp16 quantized matmul, which ran
    # over 20 minutes for the 8-request phase on 2 cores: this measures its one-request figures only.
    parser.add_argument("--stock-single-only", action="store_true",
                        help="stock mlx_lm.server: only the one-request phase")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from mlxtune.blas import blas_env

    env = {**os.environ, **blas_env()}
    model_dir = Path(subprocess.run([sys.executable, "-m", "mlxtune", "models", "path", args.model],
                                    check=True, capture_output=True, text=True, env=env)
                     .stdout.strip())
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    adapters = {f"lora{i}": random_adapter(model_dir, tmp / f"lora{i}", i) for i in (1, 2)}
    results = {}

    port = free_port()
    cmd = [sys.executable, "-m", "mlxtune", "serve", "--model", str(model_dir), "--port",
           str(port), "--max-batch", str(args.concurrency),
           *(x for n, p in adapters.items() for x in ("--adapter", f"{n}={p}"))]
    proc = start(cmd, port, env)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        results["mlxtune serve"] = measure(url, str(model_dir), args.max_tokens,
                                           args.concurrency, args.repeats)
        results["mlxtune serve"]["switch"] = switch_cost(url, [str(model_dir), *adapters])
        print(json.dumps({"mlxtune serve": results["mlxtune serve"]}), flush=True)
    finally:
        stop(proc)

    port = free_port()
    proc = start([sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir),
                  "--port", str(port)], port, env)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        results["mlx_lm.server"] = measure(url, "default_model", args.max_tokens,
                                           args.concurrency, args.repeats, args.stock_single_only)
        paths = {str(model_dir): None, **{n: str(p) for n, p in adapters.items()}}
        if not args.stock_single_only:
            results["mlx_lm.server"]["switch"] = switch_cost(
                url, list(paths), rounds=2,
                request=lambda n: ("default_model", {"adapters": paths[n]} if paths[n] else {}))
    finally:
        stop(proc)

    ours, stock = results["mlxtune serve"], results["mlx_lm.server"]
    rows = [("TTFT, 1 request (s)", "ttft_1", False), ("gen tokens/s, 1 request", "tps_1", True),
            (f"TTFT, {args.concurrency} concurrent (s, mean)", "ttft_n", False),
            (f"aggregate tokens/s, {args.concurrency} concurrent", "tps_n", True),
            ("adapter switch cost (s)", "switch", False)]
    print(f"model {model_dir}, {args.max_tokens} tokens per answer, greedy")
    print(f"{'':42} {'mlxtune serve':>14} {'mlx_lm.server':>14} {'ours/stock':>11}")
    for label, key, higher in rows:
        if stock[key] is None:
            print(f"{label:42} {ours[key]:14.3f} {'not run':>14}")
            continue
        ratio = ours[key] / stock[key] if stock[key] else float("nan")
        print(f"{label:42} {ours[key]:14.3f} {stock[key]:14.3f} {ratio:10.2f}x"
              f"{'' if higher else ' (lower is better)'}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
