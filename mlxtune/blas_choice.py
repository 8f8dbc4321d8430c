"""Which BLAS MLX's Linux CPU backend should call here, picked by measuring, not by vendor name.

Every library that exports the standard CBLAS/BLAS symbols is a candidate: the system OpenBLAS,
Intel's MKL from PyPI's `mkl` wheel (setup.sh installs it into .venv on x86-64 Linux), BLIS where
Debian's libblis4-pthread is installed. Which is fastest depends on the CPU and on the shapes: on
a 2-core Sapphire Rapids MKL made a QLoRA step 1.12x faster than OpenBLAS 0.3.21, on other CPUs it
may lose. So `python -m mlxtune.blas --pick` (setup.sh runs it) times the matmul shapes of a
training step under each candidate, each in a child process started with that library preloaded,
and saves the figures and the winner for this CPU; later runs preload the winner. Nothing here
imports mlx except `measure`, which runs in the children.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlxtune.home import mlxtune_home

# The matmuls of a QLoRA step of a ~0.1-1B model on 512 tokens: (tokens, inputs, outputs), with
# the weight transposed as nn.Linear keeps it, plus the backward's un-transposed dx = dy @ W.
STEP_SHAPES = [(512, 576, 1536, True), (512, 1536, 576, True), (512, 576, 576, True),
               (512, 1536, 576, False), (512, 576, 1536, False), (512, 576, 8192, True),
               (1024, 1024, 1024, False)]


@dataclass(frozen=True)
class Candidate:
    """A BLAS library MLX could call: its name, path, and the environment it needs."""

    name: str
    library: str
    env: dict[str, str] = field(default_factory=dict, compare=False)


def _prepend(var: str, value: str, environ) -> str:
    return ":".join([value, *[p for p in environ.get(var, "").split(":") if p and p != value]])


def mkl_candidate(prefix: str = sys.prefix, environ=os.environ) -> Candidate | None:
    """MKL from the `mkl` wheel in this environment (its libraries land in <prefix>/lib)."""
    libdir = Path(prefix) / "lib"
    found = sorted(glob.glob(str(libdir / "libmkl_rt.so*")))
    if not found:
        return None
    # libmkl_rt dlopens its threading layer and core by name: they must be on the search path.
    # Intel's OpenMP runtime when the intel-openmp wheel is there, else GCC's libgomp.
    layer = "INTEL" if glob.glob(str(libdir / "libiomp5.so")) else "GNU"
    return Candidate("mkl", found[0], {"LD_LIBRARY_PATH": _prepend("LD_LIBRARY_PATH",
                                                                  str(libdir), environ),
                                       "MKL_THREADING_LAYER": layer})


def blis_candidate() -> Candidate | None:
    """Debian's multithreaded BLIS, where installed (libblis4-pthread)."""
    path = f"/usr/lib/{platform.machine()}-linux-gnu/blis-pthread/libblis.so.4"
    if not os.path.isfile(path):
        return None
    # BLIS runs one thread unless told otherwise.
    return Candidate("blis", path, {"BLIS_NUM_THREADS": str(os.cpu_count() or 1)})


def cpuinfo_field(name: str, text: str | None = None) -> str | None:
    """The first `name` line's value in /proc/cpuinfo (or in `text`); None off Linux."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    match = re.search(rf"^{re.escape(name)}\s*:\s*(.+)$", text, re.M)
    return match.group(1).strip() if match else None


def cpu_key(cpuinfo: str | None = None) -> str:
    """What a saved pick is valid for: this CPU model, its flags and core count."""
    flags = " ".join(sorted((cpuinfo_field("flags", cpuinfo) or "").split()))
    digest = hashlib.sha1(flags.encode()).hexdigest()[:12]
    return f"{cpuinfo_field('model name', cpuinfo) or platform.processor()}|{os.cpu_count()}|{digest}"


def choice_path() -> Path:
    """Where the measured picks are kept: one file per mlxtune home, an entry per CPU and set of
    candidate libraries."""
    return mlxtune_home() / "blas-choice.json"


def _entry_key(candidates: list[Candidate], cpuinfo: str | None) -> str:
    # One saved pick per CPU and set of candidate libraries: two virtual environments (each with
    # its own MKL) on one machine keep a pick each instead of measuring over each other's.
    libraries = "|".join(sorted(f"{c.name}={c.library}" for c in candidates))
    return hashlib.sha1(f"{cpu_key(cpuinfo)}|{libraries}".encode()).hexdigest()[:16]


def _saved_entries() -> dict:
    try:
        saved = json.loads(choice_path().read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def saved_choice(candidates: list[Candidate], cpuinfo: str | None = None) -> dict | None:
    """The saved measurement, if it was made on this CPU with these same candidates."""
    entry = _saved_entries().get(_entry_key(candidates, cpuinfo))
    return entry if isinstance(entry, dict) and "candidates" in entry else None


def measure(repeats: int = 5) -> float:
    """GFLOP/s of STEP_SHAPES' matmuls in this process (runs in a child with one BLAS loaded)."""
    import mlx.core as mx

    flops = seconds = 0.0
    with mx.stream(mx.cpu):
        for m, k, n, transposed in STEP_SHAPES:
            a = mx.random.normal((m, k))
            b = mx.random.normal((n, k) if transposed else (k, n))
            b = b.T if transposed else b  # a view: BLAS is called with its transpose flag
            mx.eval(a, b, a @ b)  # warm-up: thread pools, first-call setup
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                mx.eval(a @ b)
                best = min(best, time.perf_counter() - start)
            flops += 2 * m * k * n
            seconds += best
    return flops / seconds / 1e9


def measure_in_child(candidate: Candidate, base_env: dict[str, str], timeout: float = 120) -> dict:
    """Run `measure` in a new process with `candidate` preloaded: {"gflops"} or {"error"}."""
    env = {**base_env, **candidate.env, "LD_PRELOAD": candidate.library}
    # A library that failed to load (ld.so only warns) would measure MLX's bundled reference
    # BLAS instead: the child checks first and measures only what it was given.
    code = ("import json, os, sys, mlxtune.blas_choice as c, mlxtune.platform as p; "
            "want = os.path.realpath(sys.argv[1]); "
            "ok = any(os.path.realpath(x) == want for x in p.loaded_blas()); "
            "print(json.dumps({'gflops': c.measure()} if ok else "
            "{'error': 'the library did not load'}))")
    try:
        out = subprocess.run([sys.executable, "-c", code, candidate.library], env=env,
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result in {timeout:.0f} s"}
    if out.returncode != 0:
        lines = (out.stderr.strip() or f"exit code {out.returncode}").splitlines()
        return {"error": lines[-1][:200]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"gflops": round(result["gflops"], 1)} if "gflops" in result else result


def pick(candidates: list[Candidate], base_env: dict[str, str], cpuinfo: str | None = None,
         rounds: int = 2) -> dict:
    """Measure every candidate, save the figures and the fastest for this CPU; return them.

    The candidates take turns for `rounds` rounds and each keeps its best, so a burst of other
    work on the machine does not decide the pick alone."""
    measured = {c.name: {"library": c.library} for c in candidates}
    for _ in range(rounds):
        for c in candidates:
            result = measure_in_child(c, base_env)
            best = measured[c.name]
            if "gflops" in result and result["gflops"] > best.get("gflops", 0):
                best.pop("error", None)
                best["gflops"] = result["gflops"]
            elif "gflops" not in best:
                best.update(result)
    working = [name for name, m in measured.items() if "gflops" in m]
    best = max(working, key=lambda name: measured[name]["gflops"]) if working else None
    saved = {"cpu": cpu_key(cpuinfo), "picked": best, "candidates": measured,
             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    from mlxtune.atomic import write_text

    entries = {**_saved_entries(), _entry_key(candidates, cpuinfo): saved}
    write_text(choice_path(), json.dumps(entries, indent=1) + "\n")
    return saved
