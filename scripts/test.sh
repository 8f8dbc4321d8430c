#!/usr/bin/env bash
# Set up (idempotent), then run the whole test suite, slow end-to-end tests included.
#
#   ./scripts/test.sh [pytest args]             the suite (-m "not slow": the quick inner loop)
#   ./scripts/test.sh --variants [pytest args]  the numerics tests again under each compute
#                                               variant: OpenBLAS Haswell, SkylakeX (AVX-512 CPUs
#                                               only), Zen kernels, mlxtune's CPU kernels off, and
#                                               the fast BLAS off (the bundled reference BLAS)
set -euo pipefail
cd "$(dirname "$0")/.."
variants=0
if [ "${1:-}" = "--variants" ]; then
  variants=1
  shift
fi
./scripts/setup.sh
# Plain python/pytest processes get the same fast BLAS the mlxtune command loads for itself.
eval "$(.venv/bin/python -m mlxtune.blas --env)"
if [ "$variants" = 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi

# A result that holds only under one CPU's float rounding is a bug: each variant reruns every
# test marked `numerics` (the slowest variant, the reference BLAS, skips the slow ones). All
# variants run; the exit status says whether any failed.
failed=()
run_variant() {  # name, marks, then what `env` takes: -u NAME to unset, then NAME=value
  local name=$1 marks=$2
  shift 2
  echo "variants: $name"
  env "$@" .venv/bin/python -m pytest -q -m "$marks" ${extra[@]+"${extra[@]}"} \
    || failed+=("$name")
}
extra=("$@")
cores="Haswell Zen"
if grep -qw avx512bw /proc/cpuinfo 2>/dev/null && grep -qw avx512vl /proc/cpuinfo; then
  cores="Haswell SkylakeX Zen"  # SkylakeX's kernels need AVX-512: elsewhere they would crash
else
  echo "variants: SkylakeX skipped (this CPU has no AVX-512)"
fi
# The suite above ran on the BLAS measured fastest here (OpenBLAS or MKL: mlxtune.blas --pick);
# the core-type variants run OpenBLAS itself whichever was picked.
openblas=$(.venv/bin/python -c "from mlxtune.blas import find_blas; print(find_blas({}) or '')")
if [ -n "${LD_PRELOAD:-}" ] && [ -n "$openblas" ]; then
  for core in $cores; do
    run_variant "OPENBLAS_CORETYPE=$core" numerics -u MKL_THREADING_LAYER \
      LD_PRELOAD="$openblas" OPENBLAS_CORETYPE="$core"
  done
else
  echo "variants: OpenBLAS core types skipped (no OpenBLAS is preloaded here)"
fi
run_variant "MLXTUNE_CPU_KERNELS=0" numerics MLXTUNE_CPU_KERNELS=0
run_variant "MLXTUNE_FAST_BLAS=0 (reference BLAS)" "numerics and not slow" -u LD_PRELOAD \
  -u MLXTUNE_BLAS_PRELOADED -u OPENBLAS_CORETYPE -u MKL_THREADING_LAYER MLXTUNE_FAST_BLAS=0
if [ ${#failed[@]} -gt 0 ]; then
  printf 'variants: FAILED under: %s\n' "${failed[*]}"
  exit 1
fi
echo "variants: the numerics tests passed under every variant above"
