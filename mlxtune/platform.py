"""What machine we run on: OS, chip, MLX backend, BLAS, memory, and how fast MLX multiplies here."""

from __future__ import annotations

import os
import platform as _platform
import re
import subprocess
import sys
import time
from pathlib import Path


def backend() -> str:
    """The device MLX computes on by default: 'metal', 'cuda' or 'cpu'."""
    import mlx.core as mx

    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def chip_name() -> str:
    """A human name for the processor (Apple chip or CPU model)."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5)
            if out.stdout.strip():
                return out.stdout.strip()
        except OSError:
            pass
    from mlxtune.blas_choice import cpuinfo_field

    return cpuinfo_field("model name") or _platform.processor() or _platform.machine()


def total_memory() -> int:
    """Bytes of physical memory (unified memory on a Mac)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def available_memory() -> int:
    """Bytes of memory free for a new job right now (MemAvailable on Linux, total elsewhere)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read_text(), re.M)
        if match:
            return int(match.group(1)) * 1024
    return total_memory()


def loaded_blas() -> list[str]:
    """Paths of the BLAS libraries this process has loaded (Linux; empty where it cannot tell)."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return []
    found = []
    for line in maps.read_text().splitlines():
        path = line.split()[-1] if "/" in line else ""
        name = os.path.basename(path).lower()
        if ("blas" in name or "mkl_rt" in name or "blis" in name) and path not in found:
            found.append(path)
    return found


def measure_matmul_gflops(n: int = 1024, repeats: int = 3) -> float:
    """GFLOP/s of an n x n fp32 matmul on MLX's CPU device: the BLAS MLX actually calls."""
    import mlx.core as mx

    with mx.stream(mx.cpu):
        a = mx.random.normal((n, n))
        b = mx.random.normal((n, n))
        mx.eval(a, b, a @ b)  # warm-up: thread pools and first-call setup
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            mx.eval(a @ b)
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def system_report() -> dict:
    """Everything `mlxtune doctor` shows, measured now."""
    import mlx.core as mx

    from mlxtune import kernels
    from mlxtune.blas import describe as fast_blas_state

    gflops = measure_matmul_gflops()
    blas = loaded_blas()
    report = {
        "os": f"{_platform.system()} {_platform.release()} ({_platform.machine()})",
        "python": _platform.python_version(),
        "chip": chip_name(),
        "cores": os.cpu_count(),
        "memory_gb": round(total_memory() / 2**30, 1),
        "available_gb": round(available_memory() / 2**30, 1),
        "mlx": mx.__version__,
        "backend": backend(),
        "blas": blas,
        "fast_blas": fast_blas_state(),
        "cpu_matmul_gflops": round(gflops, 1),
        "cpu_kernels": kernels.status(),
        "advice": [],
    }
    advice = report["advice"]
    if report["backend"] == "cpu" and sys.platform.startswith("linux"):
        if gflops < 30 and report["fast_blas"]["fast_blas"] != "on":
            advice.append(f"MLX's CPU matmul runs at {gflops:.0f} GFLOP/s with the fast BLAS "
                          "turned off (MLXTUNE_FAST_BLAS=0): unset it to load OpenBLAS")
        elif gflops < 30 and not report["fast_blas"]["preloaded"]:
            advice.append(f"MLX's CPU matmul runs at {gflops:.0f} GFLOP/s, the speed of the "
                          "reference BLAS: run ./scripts/setup.sh (it installs OpenBLAS) and use "
                          "the mlxtune command, which loads it for MLX")
        elif gflops < 30:
            # OpenBLAS is loaded yet slow: the cores are busy with something else.
            advice.append(f"MLX's CPU matmul runs at {gflops:.0f} GFLOP/s with OpenBLAS loaded: "
                          "other programs are using the CPU (check the load with `uptime`)")
        if not report["cpu_kernels"].startswith("in use"):
            advice.append(f"mlxtune's CPU kernels: {report['cpu_kernels']}; without them "
                          "de-quantizing 4-bit weights is ~8x slower")
    if report["available_gb"] and report["available_gb"] < 4:
        advice.append(f"only {report['available_gb']} GB of memory is free: close other programs "
                      "or use a smaller model, batch or sequence length")
    return report
