#!/usr/bin/env bash
# SFT, then DPO starting from the SFT adapter (its frozen copy is the reference), then a verified merge.
#   bash examples/sft_then_dpo.sh                   # the embedded model and bundled data
#   MODEL=path/to/model STEPS=40 OUT=runs/x bash examples/sft_then_dpo.sh
set -euo pipefail
MODEL_ARGS=()
if [[ -n "${MODEL:-}" ]]; then MODEL_ARGS=(--model "$MODEL"); fi
STEPS="${STEPS:-60}"
OUT="${OUT:-runs/sft-then-dpo}"
LORAKIT="${LORAKIT:-lorakit}"

$LORAKIT train "${MODEL_ARGS[@]}" --output "$OUT/sft" --max-steps "$STEPS" --overwrite
$LORAKIT dpo "${MODEL_ARGS[@]}" --adapter "$OUT/sft/adapter" --output "$OUT/dpo" --max-steps "$STEPS" \
    --beta 0.1 --overwrite
$LORAKIT inspect "$OUT/dpo/adapter"
$LORAKIT merge "${MODEL_ARGS[@]}" --adapter "$OUT/dpo/adapter" --output "$OUT/merged"
