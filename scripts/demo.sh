#!/usr/bin/env bash
# The whole workflow on the built-in model and the shipped data, end to end:
#   setup -> prepare -> train -> fuse -> serve (background) -> eval base vs tuned -> stop server.
# Fails loudly at the first failing step and always stops the server it started.
# Outputs go to demo/ (data, run, fused model, eval report). Minutes on a Mac; longer on 2 Linux cores.
set -euo pipefail
cd "$(dirname "$0")/.."

# DEMO_SETUP=0 skips the install step (tests/test_demo.py: a test installs nothing).
if [ "${DEMO_SETUP:-1}" != 0 ]; then
  ./scripts/setup.sh
fi
MLXTUNE=.venv/bin/mlxtune
OUT=${DEMO_OUT:-demo}
PORT=${DEMO_PORT:-8765}
CONFIG=${DEMO_CONFIG:-configs/quickstart.yaml}
# Extra flags, for a cut-down run (tests/test_demo.py): e.g. DEMO_TRAIN_ARGS="--set iters=4".
read -r -a TRAIN_ARGS <<<"${DEMO_TRAIN_ARGS:-}"
read -r -a EVAL_ARGS <<<"${DEMO_EVAL_ARGS:-}"
mkdir -p "$OUT"

step() { printf '\n== %s\n' "$*"; }
server_pid=""
stop_server() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    echo "demo: server stopped"
  fi
}
trap stop_server EXIT
trap 'echo "demo: FAILED at: $BASH_COMMAND" >&2' ERR

step "1/5 prepare: data/raw/people.json -> $OUT/data"
$MLXTUNE prepare data/raw/people.json --out "$OUT/data" --valid-fraction 0.1 \
  --test-fraction 0.1 --seed 0 --model smollm2-135m --max-tokens 128

step "2/5 train: $CONFIG"
$MLXTUNE train "$CONFIG" --set data="$OUT/data" --set adapter_path="$OUT/run" \
  ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}

step "3/5 fuse: $OUT/run -> $OUT/fused"
$MLXTUNE fuse --run "$OUT/run" --out "$OUT/fused"

step "4/5 serve: base + adapter on 127.0.0.1:$PORT"
$MLXTUNE serve --model smollm2-135m --adapter tuned="$OUT/run" --port "$PORT" \
  >"$OUT/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 240); do
  if curl -fs "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "demo: the server exited; its log:" >&2; cat "$OUT/server.log" >&2; exit 1
  fi
  sleep 0.5
done
curl -fs "http://127.0.0.1:$PORT/health" >/dev/null

step "5/5 eval: tuned vs base on the held-out test split"
# A previous demo's eval is kept as eval.previous (eval itself refuses to overwrite results).
if [ -e "$OUT/eval" ]; then
  rm -rf "$OUT/eval.previous"
  mv "$OUT/eval" "$OUT/eval.previous"
fi
$MLXTUNE eval --data "$OUT/data/test.jsonl" --url "http://127.0.0.1:$PORT/v1" --model tuned \
  --compare smollm2-135m --metrics exact,json,chrf --max-tokens 48 --out "$OUT/eval" \
  ${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"}

stop_server
step "done"
echo "report:  $OUT/eval/report.html"
echo "run:     $OUT/run (adapters, metrics.jsonl, loss.png)"
echo "fused:   $OUT/fused"
