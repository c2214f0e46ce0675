#!/usr/bin/env bash
# Issue 12, rung 1 on one H200: Zoology's MQAR cells (V=8192, width 128, 2 blocks,
# 256:16/512:32/1024:64 mixed) for the pair memory trained reading its top 32 entries (the CPU
# showed a top-8 read in training never starts to learn) and for the transformer, each with its
# own 2-point learning-rate sweep (15 s per rate) and the same 2.5-minute budget.
# Results: $1/recall_gpu.json, written after every scored cell; logs beside it, appended to.
set -uo pipefail
source "$(dirname "$0")/recall_gpu_setup.sh" "$1"
common=(--rungs 1 --widths 128 --layers 2 --cells 256:16,512:32,1024:64 --vocab-size 8192
        --lrs 0.001,0.003 --batch-size 64 --sweep-minutes 0.25 --minutes 2.5 --out "$out/recall_gpu.json")
$horizon bench recall "${common[@]}" --models horizon_pair_memory --label gpu-pair-c16-k32 \
  --model-overrides '{"chunk_size": 16, "memory_topk": 32}' 2>&1 | tee -a "$out/rung1.log"
$horizon bench recall "${common[@]}" --models transformer --label gpu 2>&1 | tee -a "$out/rung1.log"
