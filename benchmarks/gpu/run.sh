#!/usr/bin/env bash
# Issue 19's GPU run in one call (under 8 minutes on an H200): `pytest -m cuda`, then training throughput and
# decoding, lorakit against PEFT. Results go to $OUT as JSON (summary.json first). Needs only torch,
# transformers, accelerate and peft; lorakit comes from src/ (PYTHONPATH), liger-kernel is used if installed.
#
#   OUT=/tmp/gpu-out bash benchmarks/gpu/run.sh          # on the GPU machine
#   OUT=/tmp/gpu-out bash benchmarks/gpu/run.sh --tiny   # CPU dry run: tiny models, a few cuda tests on the CPU
#
# Every step has its own time limit, so one that overruns still leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?set OUT to the directory for the results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src:$PWD/tests:$PWD/benchmarks/gpu${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

tiny=()
tests=(tests/test_cuda.py -m cuda)
limits=(150 230 100)  # seconds: pytest, training, decoding (8 minutes in all)
if [[ ${1:-} == --tiny ]]; then
  tiny=(--tiny)
  export LORAKIT_TEST_DEVICE=cpu  # run the cuda tests' code on the CPU
  tests+=(-k "logits or mixed or merge")
  limits=(600 900 300)
fi

step() {  # step NAME LIMIT COMMAND...: run it under its limit, log its output, record its exit status
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local code=$?
  echo "{\"step\": \"$name\", \"exit\": $code, \"limit_s\": $limit, \"seconds\": $((SECONDS - started))}" >>"$OUT/steps.jsonl"
  echo "$name: exit $code after $((SECONDS - started)) s"
}

: >"$OUT/steps.jsonl"
step pytest_cuda "${limits[0]}" "$PY" -m pytest -q -p no:cacheprovider "${tests[@]}" \
  --junitxml="$OUT/pytest_cuda.xml" --basetemp="${TMPDIR:-/tmp}/lorakit-gpu-pytest"
step train "${limits[1]}" "$PY" benchmarks/gpu/train_throughput.py "${tiny[@]}" --out "$OUT/train.json" \
  --budget $((limits[1] - 60))
step decode "${limits[2]}" "$PY" benchmarks/gpu/decode.py "${tiny[@]}" --out "$OUT/decode.json"
"$PY" benchmarks/gpu/summary.py "$OUT" "${tiny[@]}"
