"""Where a training step's time goes, for scripts/bench_train.py --profile: perf samples of the
timed steps only, sorted into BLAS, de-quantizing, the loss kernels, the other ops, Python and the
OS kernel; and the arithmetic a step does against the BLAS's measured peak.

perf (Debian's linux-perf) starts each leg with its counters off; the leg switches them on for
its timed steps and off after, through perf's control FIFO, so start-up, loading and warm-up
steps are not counted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CTL_VAR, ACK_VAR = "BENCH_PERF_CTL", "BENCH_PERF_ACK"
SAMPLE_HZ = 499  # samples a second per busy thread

# (part, what a sample's shared object or symbol contains), the first match wins. PyTorch's BLAS
# (MKL, oneDNN's JIT GEMMs) lives inside libtorch_cpu, so symbols count, not only libraries.
PARTS = [
    ("BLAS", ("openblas", "libblas", "mkl_blas", "libmkl", "sgemm", "gemm", "dnnl", "[JIT]")),
    ("mlxtune kernels (dequantize, softmax, attention)", ("_cpu_kernels",)),
    ("OpenMP runtime (thread waits)", ("libgomp", "libiomp")),
    ("Python", ("libpython",)),
    ("OS kernel (page faults, thread waits)", ("[kernel.kallsyms]",)),
]
OTHER = "other ops (MLX / PyTorch)"


def perf_available() -> str | None:
    """Why profiling cannot run here, or None when it can."""
    if shutil.which("perf") is None:
        return "perf is not installed (Debian: apt-get install linux-perf)"
    probe = subprocess.run(["perf", "stat", "-e", "task-clock", "true"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        return f"perf cannot count here: {probe.stderr.strip().splitlines()[-1:]}"
    return None


def switch(on: bool) -> None:
    """In a leg's process: turn perf's counters on or off (nothing when not profiled)."""
    ctl = os.environ.get(CTL_VAR)
    if not ctl:
        return
    with open(ctl, "w") as f:
        f.write("enable\n" if on else "disable\n")
    with open(os.environ[ACK_VAR]) as f:
        f.readline()


def profiled(cmd: list[str], env: dict, scratch: Path) -> tuple[list[str], dict, Path]:
    """`cmd` wrapped in perf record with counters off until the leg switches them on."""
    ctl, ack, data = scratch / "ctl", scratch / "ack", scratch / "perf.data"
    for fifo in (ctl, ack):
        if not fifo.exists():
            os.mkfifo(fifo)
    wrapped = ["perf", "record", "-q", "-F", str(SAMPLE_HZ), "-D", "-1", "-o", str(data),
               "--control", f"fifo:{ctl},{ack}", "--", *cmd]
    return wrapped, {**env, CTL_VAR: str(ctl), ACK_VAR: str(ack)}, data


def breakdown(data: Path, steps: int) -> dict[str, float]:
    """{part: CPU seconds per step, all threads} of a perf.data file covering `steps` steps."""
    report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "-n",
                             "--sort", "dso,sym"], capture_output=True, text=True).stdout
    seconds: dict[str, float] = {}
    for line in report.splitlines():
        m = re.match(r"\s*[\d.]+%\s+(\d+)\s+(\S+)\s+\[.\]\s+(.*)$", line)
        if not m:
            continue
        where = f"{m.group(2)} {m.group(3)}"
        part = next((name for name, keys in PARTS if any(k in where for k in keys)), OTHER)
        seconds[part] = seconds.get(part, 0.0) + int(m.group(1)) / SAMPLE_HZ / max(steps, 1)
    return seconds


def step_gflop(config: dict, batch: int, seq: int, lora_layers: int) -> float:
    """GFLOP of one LoRA step of a llama-shaped model: the whole forward, and the backward down
    to the lowest LoRA layer (input gradients only: the base is frozen) plus the head's."""
    d, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads) * (d // heads)
    per_layer = 2 * (2 * d * d + 2 * d * kv + 3 * d * inter) + 2 * 2 * d * seq / 2  # + attention
    head = 2 * d * config["vocab_size"]
    tokens = batch * seq
    forward = tokens * (config["num_hidden_layers"] * per_layer + head)
    backward = tokens * (lora_layers * per_layer + head)
    return (forward + backward) / 1e9


_PEAK_CODE = {
    "mlx": ("import mlx.core as mx\n"
            "a = mx.random.normal((1024, 1024)); b = mx.random.normal((1024, 1024)); mx.eval(a, b)\n"
            "run = lambda: mx.eval(a @ b)\n"),
    "torch": ("import torch\n"
              "a = torch.randn(1024, 1024); b = torch.randn(1024, 1024)\n"
              "run = lambda: a @ b\n"),
}


def blas_peak(env: dict, python: str, framework: str = "mlx") -> float | None:
    """GFLOP/s of a 1024^3 fp32 matmul (best of 20) in MLX or PyTorch, in a fresh process with a
    leg's environment: the BLAS's peak on this machine, to set achieved GFLOP/s against."""
    code = (_PEAK_CODE[framework] + "import time\nfor _ in range(3): run()\nbest = 1e9\n"
            "for _ in range(20):\n"
            "    t = time.perf_counter(); run(); best = min(best, time.perf_counter() - t)\n"
            "print(2 * 1024 ** 3 / best / 1e9)\n")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True,
                              cwd=tmp)
    try:
        return float(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def format_breakdown(name: str, seconds: dict[str, float], s_per_step: float) -> str:
    """One leg's breakdown as lines: each part's CPU seconds per step and share."""
    order = [p for p, _ in PARTS] + [OTHER]
    total = sum(seconds.values()) or 1.0
    lines = [f"{name}: CPU time of one timed step by part (perf samples, all threads; the step "
             f"took {s_per_step:.2f} s of wall time, {total:.2f} s of CPU)"]
    for part in sorted(seconds, key=order.index):
        lines.append(f"  {part:<40} {seconds[part]:6.2f} s  {seconds[part] / total:6.1%}")
    return "\n".join(lines)
