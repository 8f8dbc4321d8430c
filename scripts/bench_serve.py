"""mlxtune serve vs llama.cpp's llama-server (and, optionally, stock mlx_lm.server) on the same
model, in one run, on loopback (127.0.0.1 only).

    python scripts/bench_serve.py [--model smollm2-135m] [--max-tokens 64] [--concurrency 8]
                                  [--threads N] [--mixed 12] [--stock] [--no-llama]

mlxtune serve and llama-server run side by side in subprocesses, but never both busy: their
one-request runs alternate (ABBA rounds), so a machine that drifts (these VMs: 10-25% between
minutes) slows both alike and the ratio, the median of each round's, holds; each server's
concurrent phase then runs while the other idles. Stock mlx_lm.server runs alone after. mlxtune
gets the fast BLAS preload; llama-server (built once from the llama.cpp source vendored in
PyPI's llama-cpp-python sdist, into ~/.cache/mlxtune-bench/llama.cpp) serves the GGUF the
built-in model is converted from, with N parallel slots and the same number of threads as
mlxtune uses. Measured with the openai client, streaming, the same requests for every server:
time to first token and generation tokens/s for one request, aggregate tokens/s for N concurrent
requests, and mlxtune's adapter-switch cost (another adapter per request; mlx_lm.server's: the
request's `adapters` field, which reloads the model). mlxtune's mixed leg (--mixed N): N
concurrent requests over the base and 3 adapters (one mixed batch) vs the same N on one adapter. Adapters are random rank-8 LoRA weights on
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


LLAMA_CACHE = Path.home() / ".cache" / "mlxtune-bench" / "llama.cpp"
# llama.cpp's CPU build: tuned for this CPU, but without the AMX kernels (the VMs here report
# AMX and do not grant it: ggml's AMX matmul dies on SIGILL), and without the curl downloader.
# With GGML_NATIVE, ggml takes AMX from -march=native whatever GGML_AMX_* say: -mno-amx-* it is.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
LLAMA_CMAKE = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_AMX_TILE=OFF",
               "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF", "-DLLAMA_CURL=OFF",
               f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]


def llama_server(cache: Path = LLAMA_CACHE) -> Path:
    """llama.cpp's llama-server, built once into `cache` from the llama.cpp source vendored in
    PyPI's llama-cpp-python sdist (a benchmark-only dependency: never installed, never committed)."""
    import tarfile

    binary = cache / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    sdist = cache / "sdist"
    if not list(sdist.glob("llama_cpp_python-*.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "llama-cpp-python", "-d", str(sdist)], check=True)
    tarball = sorted(sdist.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(tarball) as tar:
        tar.extractall(cache / "src", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    source = cache / "src" / tarball.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    print(f"building llama-server from {source} (once, a few minutes)", flush=True)
    subprocess.run(["cmake", "-S", str(source), "-B", str(cache / "build"), *LLAMA_CMAKE],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(cache / "build"), "--target", "llama-server", "-j2"],
                   check=True, stdout=subprocess.DEVNULL)
    return binary


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


def _client(base_url: str):
    import openai

    return openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)


def singles(servers: dict, max_tokens: int, repeats: int) -> dict:
    """One request at a time, the servers ({name: (url, model)}) taking turns in ABBA rounds:
    per server the median time to first token and generation tokens/s, and for every server
    after the first (mlxtune's peers) the median of the rounds' ratios to the first."""
    clients = {name: (_client(url), model) for name, (url, model) in servers.items()}
    for client, model in clients.values():
        one(client, model, 8)  # warm-up: compile, caches
    runs: dict = {name: [] for name in clients}
    order = list(clients)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            runs[name].append(one(clients[name][0], clients[name][1], max_tokens))
    first = order[0]
    out = {}
    for name, rs in runs.items():
        out[name] = {"ttft_1": statistics.median(x["ttft"] for x in rs),
                     "tps_1": statistics.median(x["gen_tps"] for x in rs)}
        if name != first:  # per round, ours / theirs (tokens/s) and theirs / ours (TTFT)
            pairs = list(zip(runs[first], rs))
            out[name]["round_tps_ratio"] = statistics.median(
                a["gen_tps"] / b["gen_tps"] for a, b in pairs if b["gen_tps"])
            out[name]["round_ttft_ratio"] = statistics.median(
                b["ttft"] / a["ttft"] for a, b in pairs if a["ttft"])
        # Printed as it goes: a slow server's first numbers are seen even if a later phase is cut.
        print(json.dumps({name: out[name]}), flush=True)
    return out


def concurrent(base_url: str, model: str, max_tokens: int, concurrency: int) -> dict:
    """`concurrency` requests at once: their mean time to first token, aggregate tokens/s."""
    client = _client(base_url)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda _: one(client, model, max_tokens), range(concurrency)))
    wall = time.perf_counter() - t0
    return {"ttft_n": statistics.mean(r["ttft"] for r in runs),
            "tps_n": sum(r["tokens"] for r in runs) / wall}


def switch_cost(base_url: str, names: list[str], request=None, rounds: int = 3) -> float:
    """Extra seconds a 1-token request takes when it uses another adapter than the last one;
    `request(name)` gives the (model, extra body) that asks for adapter `name`."""
    client = _client(base_url)
    request = request or (lambda name: (name, None))
    same, switched = [], []
    for _ in range(rounds):
        for name in names:
            switched.append(one(client, *request(name)[:1], 1, request(name)[1])["end"])
            same.append(one(client, *request(name)[:1], 1, request(name)[1])["end"])
    return statistics.median(switched) - statistics.median(same)


def mixed_load(base_url: str, names: list[str], max_tokens: int, n: int) -> dict:
    """Aggregate tokens/s of `n` concurrent requests cycling over `names` (the base and
    adapters, one mixed batch) and of the same `n` all on names[1] (one adapter), and their
    ratio: what serving many adapters at once costs over serving one."""
    client = _client(base_url)

    def load(models: list[str]) -> float:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(models)) as pool:
            runs = list(pool.map(lambda m: one(client, m, max_tokens), models))
        return sum(r["tokens"] for r in runs) / (time.perf_counter() - t0)

    load(names)  # warm-up: every adapter resident
    mixed = load([names[i % len(names)] for i in range(n)])
    single = load([names[1]] * n)
    result = {"mixed_tps": mixed, "one_adapter_tps": single, "mixed_vs_one": mixed / single}
    print(json.dumps({"mixed load": {"requests": n, "models": names, **result}}), flush=True)
    return result


def cpu_name() -> str:
    """The CPU's model name, printed beside every number."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()




def print_table(results: dict, concurrency: int) -> None:
    """One column per server, then each peer's ratio to mlxtune (higher is better for mlxtune)."""
    rows = [("TTFT, 1 request (s)", "ttft_1", False), ("gen tokens/s, 1 request", "tps_1", True),
            (f"TTFT, {concurrency} concurrent (s, mean)", "ttft_n", False),
            (f"aggregate tokens/s, {concurrency} concurrent", "tps_n", True),
            ("adapter switch cost (s)", "switch", False),
            ("mixed: tokens/s, base + 3 adapters", "mixed_tps", True),
            ("mixed: tokens/s, same load on 1 adapter", "one_adapter_tps", True),
            ("mixed: ratio (mixed / one adapter)", "mixed_vs_one", True)]
    ours = results["mlxtune serve"]
    peers = [n for n in results if n != "mlxtune serve"]
    head = f"{'':42}" + "".join(f"{n:>15}" for n in results)
    print(head + "".join(f"{'vs ' + n:>22}" for n in peers))
    for label, key, higher in rows:
        cells = "".join(f"{'-' if r.get(key) is None else format(r[key], '.3f'):>15}"
                        for r in results.values())
        ratios = ""
        for n in peers:
            a, b = ours.get(key), results[n].get(key)
            if a is None or b is None or not a or not b:
                ratios += f"{'-':>22}"
            else:  # "x times better": speed ours/peer, time peer/ours
                ratios += f"{(a / b if higher else b / a):21.2f}x"
        print(f"{label:42}{cells}{ratios}")
    for n in peers:
        if results[n].get("round_tps_ratio"):
            print(f"one request, median of the alternating rounds' ratios vs {n}: tokens/s "
                  f"{results[n]['round_tps_ratio']:.2f}x, TTFT "
                  f"{results[n]['round_ttft_ratio']:.2f}x")
    print("(ratios: how many times better mlxtune is; below 1 it is worse)")


def stock_leg(model_dir: Path, adapters: dict, args, env: dict) -> dict:
    """Stock mlx_lm.server alone (the others stopped): its one-request figures, and unless
    --stock-single-only its concurrent phase and adapter switch (the request's `adapters` field,
    which reloads the model)."""
    paths = {str(model_dir): None, **{n: str(p) for n, p in adapters.items()}}
    port = free_port()
    proc = start([sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--host",
                  "127.0.0.1", "--port", str(port)], port, env)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        result = singles({"mlx_lm.server": (url, "default_model")}, args.max_tokens,
                         args.repeats)["mlx_lm.server"]
        if args.stock_single_only:
            return {**result, "ttft_n": None, "tps_n": None, "switch": None}
        result.update(concurrent(url, "default_model", args.max_tokens, args.concurrency))
        result["switch"] = switch_cost(
            url, list(paths), rounds=2,
            request=lambda n: ("default_model", {"adapters": paths[n]} if paths[n] else {}))
        return result
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=6,
                        help="one-request rounds (the servers alternate: ABBA)")
    parser.add_argument("--mixed", type=int, default=12,
                        help="mlxtune's mixed-adapter leg: this many concurrent requests over the "
                        "base and 3 adapters, then all on one adapter (0: skip)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads for both servers (mlxtune's kernels, llama-server -t)")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="the GGUF llama-server serves (default: the built-in model's)")
    parser.add_argument("--no-llama", action="store_true", help="skip the llama-server peer")
    parser.add_argument("--stock", action="store_true",
                        help="also run stock mlx_lm.server (very slow on CPU)")
    # Stock mlx_lm.server on a Linux CPU batches through MLX's fp16 quantized matmul, which ran
    # over 20 minutes for the 8-request phase on 2 cores: this measures its one-request figures only.
    parser.add_argument("--stock-single-only", action="store_true",
                        help="stock mlx_lm.server: only the one-request phase")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from mlxtune.blas import blas_env

    env = {**os.environ, **blas_env(), "MLXTUNE_CPU_THREADS": str(args.threads)}
    model_dir = Path(subprocess.run([sys.executable, "-m", "mlxtune", "models", "path", args.model],
                                    check=True, capture_output=True, text=True, env=env)
                     .stdout.strip())
    gguf = args.gguf
    if gguf is None and not args.no_llama:
        from mlxtune.models.builtin import BUILTIN_MODELS, builtin_gguf

        if args.model not in BUILTIN_MODELS:
            raise SystemExit(f"{args.model} is not a built-in model: pass --gguf or --no-llama")
        gguf = builtin_gguf(args.model)
    binary = None if args.no_llama else llama_server()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads per server; "
          f"model {model_dir}; {args.max_tokens} tokens per answer, greedy", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    adapters = {f"lora{i}": random_adapter(model_dir, tmp / f"lora{i}", i) for i in (1, 2, 3)}
    procs, servers = [], {}
    try:
        port = free_port()
        procs.append(start(
            [sys.executable, "-m", "mlxtune", "serve", "--model", str(model_dir), "--host",
             "127.0.0.1", "--port", str(port),
             "--max-batch", str(max(args.concurrency, args.mixed)),
             *(x for n, p in adapters.items() for x in ("--adapter", f"{n}={p}"))], port, env))
        servers["mlxtune serve"] = (f"http://127.0.0.1:{port}/v1", str(model_dir))
        if binary is not None:
            port = free_port()
            procs.append(start(
                [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                 "-np", str(args.concurrency), "-t", str(args.threads)],
                port, {**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}))
            servers["llama-server"] = (f"http://127.0.0.1:{port}/v1", "default_model")
        results = singles(servers, args.max_tokens, args.repeats)
        for name, (url, model) in servers.items():
            results[name].update(concurrent(url, model, args.max_tokens, args.concurrency))
        url = servers["mlxtune serve"][0]
        results["mlxtune serve"]["switch"] = switch_cost(url, [str(model_dir), *adapters])
        if args.mixed:
            results["mlxtune serve"].update(
                mixed_load(url, [str(model_dir), *adapters], args.max_tokens, args.mixed))
        print(json.dumps(results), flush=True)
    finally:
        for proc in procs:
            stop(proc)

    if args.stock or args.stock_single_only:
        results["mlx_lm.server"] = stock_leg(model_dir, adapters, args, env)

    print(f"CPU: {cpu_name()}; model {model_dir}; {args.max_tokens} tokens per answer, greedy")
    print_table(results, args.concurrency)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
