"""A fast BLAS for MLX's Linux CPU backend: find one, pick its core type, load it before MLX.

The Linux `mlx-cpu` wheel links a bundled reference BLAS (~4 GFLOP/s for a 1024² fp32 matmul).
A library preloaded with LD_PRELOAD that exports the same symbols (cblas_sgemm, sgemm_) wins
symbol resolution, so MLX calls it instead. LD_PRELOAD is read only when a process starts, so
the CLI re-executes itself once with it set. Nothing here imports mlx.

The same re-exec gives glibc's malloc two settings (see ALLOCATOR_ENV): MLX's CPU backend keeps no
buffer cache, so every array over 32 MB (a batch's logits, a de-quantized weight) was mmap'ed
fresh and page-faulted in on every use; kept on the heap instead, an elementwise op over 50 MB
went from 47 to 7 ms and a QLoRA step of the built-in model from 2.2 to 1.95 s.

`python -m mlxtune.blas --env` prints the same environment as `export` lines for shells that
run plain `python` or pytest (scripts/test.sh uses it).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import importlib.util
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from mlxtune.blas_choice import (Candidate, blis_candidate, choice_path, cpuinfo_field,
                                 mkl_candidate, pick, saved_choice)

OFF_VAR = "MLXTUNE_FAST_BLAS"  # "0" turns all of this off
LIB_VAR = "MLXTUNE_BLAS"  # a candidate's name (openblas, mkl, blis) or a BLAS library's path
MARKER_VAR = "MLXTUNE_BLAS_PRELOADED"  # set on re-exec so it happens once

# Debian/Ubuntu's libopenblas0-pthread, then other common places (Fedora, Arch, /usr/local).
_MULTIARCH = f"{platform.machine()}-linux-gnu"
_KNOWN_PATHS = [
    f"/usr/lib/{_MULTIARCH}/openblas-pthread/libopenblas.so.0",
    f"/usr/lib/{_MULTIARCH}/libopenblas.so.0",
    f"/usr/lib/{_MULTIARCH}/openblas-openmp/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
]


# glibc reads these at process start: no mmap'ed chunks (big buffers are reused from the heap
# instead of faulted in anew) and freed heap kept, not trimmed back to the OS after every step.
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def switched_off(var: str, environ=os.environ) -> bool:
    """True when the environment variable `var` says off: 0, false, no or off."""
    return environ.get(var, "").strip().lower() in ("0", "false", "no", "off")


def disabled(environ=os.environ) -> bool:
    """True when the user turned the fast BLAS off with MLXTUNE_FAST_BLAS=0."""
    return switched_off(OFF_VAR, environ)


def exports_blas(path: str) -> bool:
    """Whether the library at `path` loads and exports the standard CBLAS/BLAS sgemm symbols."""
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    except OSError:
        return False
    return hasattr(lib, "cblas_sgemm") and hasattr(lib, "sgemm_")


def _ldconfig_openblas() -> list[str]:
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"=>\s*(\S*libopenblas\S*\.so\S*)", out)


def find_blas(environ=os.environ, verify: bool = True) -> str | None:
    """Path of a fast BLAS to preload: MLXTUNE_BLAS if set, else a system OpenBLAS, else None.

    `verify` loads each candidate to check its symbols; doctor passes False so that probing
    does not put a second BLAS into a process that already runs MLX.
    """
    def usable(path: str) -> bool:
        return os.path.isfile(path) and (not verify or exports_blas(path))

    if environ.get(LIB_VAR) and "/" in environ[LIB_VAR]:
        path = environ[LIB_VAR]
        return path if usable(path) else None
    for path in _KNOWN_PATHS + _ldconfig_openblas():
        if usable(path):
            return path
    return None


def choose_coretype(flags: set[str], vendor: str = "") -> str | None:
    """The OPENBLAS_CORETYPE for these CPU flags: None leaves it to OpenBLAS's own detection.

    OpenBLAS 0.3.21 picks the right kernel on most CPUs, but under some hypervisors it misreads
    an AVX-512 CPU and falls back to slower kernels (65 vs 300 GFLOP/s measured on SkylakeX).
    On AMD Zen 3 here, Zen and Haswell measured the same (~50 GFLOP/s on 2 loaded cores).
    """
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Zen" if "AuthenticAMD" in vendor else "Haswell"
    return None


def _reference_blas_bundled() -> bool:
    """Whether the installed MLX is the Linux CPU wheel, which bundles the reference BLAS."""
    spec = importlib.util.find_spec("mlx")  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        importlib.metadata.distribution("mlx-cuda")
        return False  # the default device is the GPU; leave the CUDA build alone
    except importlib.metadata.PackageNotFoundError:
        pass
    site = Path(list(spec.submodule_search_locations)[0]).parent
    return bool(glob.glob(str(site / "mlx_cpu.libs" / "libblas*.so*")))


_BLAS_NAMES = ("openblas", "mkl_rt", "blis")  # how a BLAS library's file name reads


def _is_blas(path: str) -> bool:
    return any(name in os.path.basename(path).lower() for name in _BLAS_NAMES)


def _already_loaded(maps: str = "/proc/self/maps") -> bool:
    try:
        return any(_is_blas(line.split()[-1]) for line in Path(maps).read_text().splitlines()
                   if "/" in line)
    except OSError:
        return False


def candidates(environ=os.environ, cpuinfo: str | None = None) -> list[Candidate]:
    """The BLAS libraries MLX could call here: the system OpenBLAS (with its core type), MKL from
    this environment, and BLIS, where present; only the one MLXTUNE_BLAS names (a candidate's
    name or a library's path) when it is set."""
    wanted = environ.get(LIB_VAR, "")
    if "/" in wanted:
        path = find_blas(environ)
        return [Candidate("user", path)] if path else []
    found = []
    openblas = find_blas({})
    if openblas:
        env = {}
        if not environ.get("OPENBLAS_CORETYPE"):
            flags = set((cpuinfo_field("flags", cpuinfo) or "").split())
            core = choose_coretype(flags, cpuinfo_field("vendor_id", cpuinfo) or "")
            env = {"OPENBLAS_CORETYPE": core} if core else {}
        found.append(Candidate("openblas", openblas, env))
    found += [c for c in (mkl_candidate(environ=environ), blis_candidate()) if c is not None]
    return [c for c in found if c.name == wanted] if wanted else found


def chosen(environ=os.environ, cpuinfo: str | None = None, name: str | None = None):
    """The candidate to preload: `name` if given, else the one measured fastest on this CPU
    (`--pick`), else the first found (OpenBLAS); None when there is none."""
    found = candidates(environ, cpuinfo)
    if name is not None:
        return next((c for c in found if c.name == name), None)
    saved = saved_choice(found, cpuinfo)
    if saved and saved.get("picked"):
        return next(c for c in found if c.name == saved["picked"])
    return found[0] if found else None


def blas_env(environ=os.environ, cpuinfo: str | None = None, name: str | None = None
             ) -> dict[str, str]:
    """The variables to add so a new process loads a fast BLAS and keeps big buffers on the heap;
    empty when none is needed (not Linux, not the CPU wheel, turned off, or already set)."""
    if not sys.platform.startswith("linux") or disabled(environ) or environ.get(MARKER_VAR):
        return {}
    if not _reference_blas_bundled():
        return {}
    env = {k: v for k, v in ALLOCATOR_ENV.items() if k not in environ}
    if any(_is_blas(p) for p in environ.get("LD_PRELOAD", "").split(":") if p):
        return env  # the user preloads a BLAS of their own
    candidate = chosen(environ, cpuinfo, name)
    if candidate is None:
        return env
    preload = [p for p in environ.get("LD_PRELOAD", "").split(":") if p]
    env.update(candidate.env)
    env.update({"LD_PRELOAD": ":".join([candidate.library, *preload]),
                MARKER_VAR: candidate.library})
    return env


def preload_fast_blas() -> None:
    """Re-execute this `mlxtune` process once with a fast BLAS preloaded, when MLX would be slow."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    # Only a real CLI process re-executes: never a test runner or a library user calling main().
    if argv0 != "mlxtune" and not sys.argv[0].endswith(os.path.join("mlxtune", "__main__.py")):
        return
    if "mlx.core" in sys.modules or _already_loaded():
        return
    env = blas_env()
    if not env:
        return
    new_env = {**os.environ, **env}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mlxtune", *sys.argv[1:]], new_env)


def describe() -> dict:
    """What this process was given (the preloaded library, core type, whether it is off) and
    the candidates' measured GFLOP/s on this CPU, when `--pick` has measured them."""
    found = candidates()
    saved = saved_choice(found)
    return {
        "fast_blas": "off (MLXTUNE_FAST_BLAS=0)" if disabled() else "on",
        "preloaded": os.environ.get(MARKER_VAR) or None,
        "coretype": os.environ.get("OPENBLAS_CORETYPE") or None,
        "found": [c.name for c in found],
        "picked": saved["picked"] if saved else None,
        "measured": saved["candidates"] if saved else None,
    }


# What blas_env adds besides the allocator settings (a candidate's own variables included).
PRELOAD_VARS = ("LD_PRELOAD", MARKER_VAR, "OPENBLAS_CORETYPE", "MKL_THREADING_LAYER",
                "BLIS_NUM_THREADS")


def without_preload(environ=os.environ) -> dict[str, str]:
    """`environ` less what a BLAS preload set: a base for a process that picks its own."""
    return {k: v for k, v in environ.items() if k not in PRELOAD_VARS}


def pick_fastest(environ=os.environ) -> dict:
    """Measure every candidate on this CPU and save the fastest (what `--pick` runs)."""
    base = {k: v for k, v in without_preload(environ).items() if k != OFF_VAR}
    return pick(candidates(environ), {**base, **ALLOCATOR_ENV})


USAGE = """usage: python -m mlxtune.blas --env [NAME] | --pick [--if-unmeasured]
  --env [NAME]  print `export` lines that load the picked BLAS (or candidate NAME) for MLX
  --pick        time the training step's matmuls under every candidate BLAS, save the fastest
                (--if-unmeasured: only when no pick was measured on this CPU yet)"""


def main(argv: list[str]) -> int:
    """`python -m mlxtune.blas --env [NAME]` prints `export` lines for a shell (nothing if not
    needed); `--pick` measures the candidates and saves the fastest for this CPU."""
    if argv[:1] == ["--pick"] and argv[1:] in ([], ["--if-unmeasured"]):
        if not sys.platform.startswith("linux") or not _reference_blas_bundled():
            print("blas: nothing to pick (MLX here does not use the bundled reference BLAS)")
            return 0
        if os.environ.get(LIB_VAR) or disabled():
            print(f"blas: not measured ({LIB_VAR} or {OFF_VAR}=0 decides)")
            return 0
        saved = saved_choice(candidates()) if argv[1:] else None
        if saved:
            print(f"blas: {saved['picked']} (measured on this CPU before)")
            return 0
        saved = pick_fastest()
        for name, m in saved["candidates"].items():
            figure = f"{m['gflops']:6.1f} GFLOP/s" if "gflops" in m else f"failed: {m['error']}"
            print(f"blas: {name:9s} {figure}  {m['library']}")
        print(f"blas: picked {saved['picked'] or 'none'} for this CPU ({choice_path()})")
        return 0
    if argv[:1] != ["--env"] or len(argv) > 2:
        print(USAGE, file=sys.stderr)
        return 2
    env = blas_env(name=argv[1] if len(argv) == 2 else None)
    env.pop(MARKER_VAR, None)  # the shell's children are not re-executed CLI processes
    for key, value in env.items():
        print(f"export {key}='{value}'")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
