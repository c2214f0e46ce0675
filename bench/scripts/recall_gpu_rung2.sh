#!/usr/bin/env bash
# Issue 12, rung 2 on one H200 (V=512, width 64, 2 blocks, 16 pairs, 256-token windows, chunks of
# 8, trained on gaps 0/128/512, each model with its own 2-point sweep of 150 steps, then 2,500
# steps): the pair memory scored reading one entry (`--eval-topk 1`: the CPU showed the softmax
# over 8 entries dilutes the answer) with memory keys of width 128 (the small preset's 32 cannot
# hold 256 key tokens near-orthogonal), to 1M tokens; the model without memory to 1M (the
# contrast); the pair memory with width-32 keys, read one, to 256K (the control for the width).
# Results: $1/recall_gpu.json, written after every scored cell; logs beside it, appended to.
set -uo pipefail
source "$(dirname "$0")/recall_gpu_setup.sh" "$1"
common=(--rungs 2 --cross-width 64 --cross-pairs 16 --vocab-size 512 --window 256 --train-gaps 0,128,512
        --lrs 0.001,0.003 --sweep-steps 150 --sweep-minutes 0 --steps 2500 --minutes 1.5 --batch-size 32
        --cross-eval-sequences 16 --eval-batch 16 --out "$out/recall_gpu.json")
memory='"chunk_size": 8, "memory_capacity": 131200, "memory_query_block": 128'
$horizon bench recall "${common[@]}" --models horizon_pair_memory --gaps 1024,16384,262144,1048576 \
  --eval-topk 1 --label gpu-pair-c8-m128-read1 --model-overrides "{$memory, \"memory_dim\": 128}" \
  2>&1 | tee -a "$out/rung2.log"
$horizon bench recall "${common[@]}" --models horizon_no_memory --gaps 1024,16384,262144,1048576 \
  --label gpu --model-overrides '{"chunk_size": 8}' 2>&1 | tee -a "$out/rung2.log"
$horizon bench recall "${common[@]}" --models horizon_pair_memory --gaps 1024,16384,262144 \
  --eval-topk 1 --label gpu-pair-c8-read1 --model-overrides "{$memory}" 2>&1 | tee -a "$out/rung2.log"
