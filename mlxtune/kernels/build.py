"""Build mlxtune's CPU kernels against the installed MLX: `python -m mlxtune.kernels.build`.

scripts/setup.sh runs this on Linux. It needs cmake, a C++20 compiler and nanobind (the
version MLX's own bindings were built with, so mx.array passes between the two modules). The
module is compiled in a scratch folder and moved into mlxtune/kernels/ in one rename, so a
failed build leaves the previous module (or none) in place; without it mlxtune uses MLX's ops.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULE = "_cpu_kernels" + sysconfig.get_config_var("EXT_SUFFIX")


def build(verbose: bool = False) -> Path:
    """Compile the extension and install it next to this file; returns its path."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found (install cmake and g++)")
    out = None if verbose else subprocess.DEVNULL
    with tempfile.TemporaryDirectory(prefix="mlxtune-kernels-") as scratch:
        for cmd in (["cmake", "-S", str(HERE), "-B", scratch, f"-DPython_EXECUTABLE={sys.executable}",
                     "-DCMAKE_BUILD_TYPE=Release"],
                    ["cmake", "--build", scratch, "-j", str(os.cpu_count() or 1)]):
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:2])} failed:\n{proc.stderr[-2000:]}")
        built = Path(scratch) / MODULE
        staged = HERE / (MODULE + ".tmp")
        shutil.copy2(built, staged)
        os.replace(staged, HERE / MODULE)
    return HERE / MODULE


def main() -> int:
    try:
        path = build(verbose="-v" in sys.argv)
    except RuntimeError as exc:
        print(f"mlxtune kernels: not built: {exc}", file=sys.stderr)
        return 2
    # Check it in a fresh process: running this module already imported mlxtune.kernels, which
    # looked for the module (the previous build, or none) before this one was built.
    check = subprocess.run([sys.executable, "-c", "from mlxtune import kernels; "
                            "print(kernels.status())"], capture_output=True, text=True)
    print(f"mlxtune kernels: built {path.name}: {check.stdout.strip() or check.stderr.strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
