#!/usr/bin/env bash
# Set up (idempotent), then run the whole test suite, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Plain python/pytest processes get the same fast BLAS the mlxtune command loads for itself.
eval "$(.venv/bin/python -m mlxtune.blas --env)"
exec .venv/bin/python -m pytest -q "$@"
