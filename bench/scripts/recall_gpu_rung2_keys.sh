#!/usr/bin/env bash
# Issue 12, rung 2 on one H200, where the pair memory's keys come from (same task and budget as
# recall_gpu_rung2.sh, width-128 memory keys, scored reading one entry):
#   1. the memory before the first block (global_layer 0): keys and queries from the token
#      embeddings alone, so nothing that drifts along the stream enters the lookup; to 1M;
#   2. the memory after block 1 (the default) again, its rate chosen by the loss where the
#      sweep's accuracies are within noise (the earlier run chose by a chance-level accuracy);
#   3. the default placement trained on longer gaps (0/512/4096), to see whether a key made
#      from the running state learns to ignore the drift it meets further out.
# Results: $1/recall_gpu.json, written after every scored cell; logs beside it, appended to.
set -uo pipefail
source "$(dirname "$0")/recall_gpu_setup.sh" "$1"
common=(--rungs 2 --models horizon_pair_memory --cross-width 64 --cross-pairs 16 --vocab-size 512 --window 256
        --lrs 0.001,0.003 --sweep-steps 150 --sweep-minutes 0 --steps 2500 --minutes 1.5 --batch-size 32
        --cross-eval-sequences 16 --eval-batch 16 --eval-topk 1 --out "$out/recall_gpu.json")
memory='"chunk_size": 8, "memory_capacity": 131200, "memory_query_block": 128, "memory_dim": 128'
$horizon bench recall "${common[@]}" --train-gaps 0,128,512 --gaps 1024,16384,262144,1048576 \
  --label gpu-pair-c8-m128-g0-read1 --model-overrides "{$memory, \"global_layer\": 0}" 2>&1 | tee -a "$out/rung2.log"
$horizon bench recall "${common[@]}" --train-gaps 0,128,512 --gaps 1024,16384,262144 \
  --label gpu-pair-c8-m128-read1-losssel --model-overrides "{$memory}" 2>&1 | tee -a "$out/rung2.log"
$horizon bench recall "${common[@]}" --train-gaps 0,512,4096 --gaps 1024,16384,262144 \
  --label gpu-pair-c8-m128-read1-gap4k --model-overrides "{$memory}" 2>&1 | tee -a "$out/rung2.log"
