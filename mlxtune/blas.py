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

OFF_VAR = "MLXTUNE_FAST_BLAS"  # "0" turns all of this off
LIB_VAR = "MLXTUNE_BLAS"  # a user's own BLAS library path
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

    if environ.get(LIB_VAR):
        path = environ[LIB_VAR]
        return path if usable(path) else None
    for path in _KNOWN_PATHS + _ldconfig_openblas():
        if usable(path):
            return path
    return None


def cpuinfo_field(name: str, text: str | None = None) -> str | None:
    """The first `name` line's value in /proc/cpuinfo (or in `text`); None off Linux."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    match = re.search(rf"^{re.escape(name)}\s*:\s*(.+)$", text, re.M)
    return match.group(1).strip() if match else None


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


def _already_loaded(maps: str = "/proc/self/maps") -> bool:
    try:
        return "openblas" in Path(maps).read_text().lower()
    except OSError:
        return False


def blas_env(environ=os.environ, cpuinfo: str | None = None) -> dict[str, str]:
    """The variables to add so a new process loads a fast BLAS and keeps big buffers on the heap;
    empty when none is needed (not Linux, not the CPU wheel, turned off, or already set)."""
    if not sys.platform.startswith("linux") or disabled(environ) or environ.get(MARKER_VAR):
        return {}
    if not _reference_blas_bundled():
        return {}
    env = {k: v for k, v in ALLOCATOR_ENV.items() if k not in environ}
    lib = None if "openblas" in environ.get("LD_PRELOAD", "").lower() else find_blas(environ)
    if lib is None:
        return env
    preload = [p for p in environ.get("LD_PRELOAD", "").split(":") if p]
    env.update({"LD_PRELOAD": ":".join([lib, *preload]), MARKER_VAR: lib})
    if "openblas" in os.path.basename(lib).lower() and not environ.get("OPENBLAS_CORETYPE"):
        flags = cpuinfo_field("flags", cpuinfo) or ""
        core = choose_coretype(set(flags.split()), cpuinfo_field("vendor_id", cpuinfo) or "")
        if core:
            env["OPENBLAS_CORETYPE"] = core
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
    """What this process was given: the preloaded library, core type, and whether it is off."""
    return {
        "fast_blas": "off (MLXTUNE_FAST_BLAS=0)" if disabled() else "on",
        "preloaded": os.environ.get(MARKER_VAR) or None,
        "coretype": os.environ.get("OPENBLAS_CORETYPE") or None,
        "found": find_blas(verify=False),
    }


def main(argv: list[str]) -> int:
    """`python -m mlxtune.blas --env`: print `export` lines for a shell (nothing if not needed)."""
    if argv[:1] != ["--env"]:
        print("usage: python -m mlxtune.blas --env", file=sys.stderr)
        return 2
    env = blas_env()
    env.pop(MARKER_VAR, None)  # the shell's children are not re-executed CLI processes
    for key, value in env.items():
        print(f"export {key}='{value}'")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
