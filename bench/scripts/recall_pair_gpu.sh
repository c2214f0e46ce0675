#!/usr/bin/env bash
# Issue 12 on one H200 with the pair memory (memory_write=pair): rung 1 at Zoology's cells
# (V=8192, width 128, 256:16/512:32/1024:64, 2-point sweep, 2 minutes), then rung 2 (V=512,
# width 64, 16 pairs, 256-token windows, gaps 1K..1M). Results: $1/recall_gpu.json, written
# after every scored cell, so a run cut short keeps what it scored (entries already there are
# refused, not overwritten); logs beside it, appended to.
set -uo pipefail
source "$(dirname "$0")/recall_gpu_setup.sh" "$1"
$horizon bench recall --rungs 1 --models horizon_pair_memory --widths 128 --layers 2 \
  --cells 256:16,512:32,1024:64 --vocab-size 8192 --lrs 0.001,0.003 --batch-size 64 \
  --sweep-minutes 0.25 --minutes 2 --model-overrides '{"chunk_size": 16}' --label gpu-pair-c16 \
  --out "$out/recall_gpu.json" 2>&1 | tee -a "$out/rung1.log"
$horizon bench recall --rungs 2 --models horizon_pair_memory --cross-width 64 --cross-pairs 16 \
  --vocab-size 512 --window 256 --train-gaps 0,128,512 --gaps 1024,16384,262144,1048576 \
  --lrs 0.001,0.003 --sweep-steps 150 --sweep-minutes 0 --steps 2500 --minutes 1.5 --batch-size 32 \
  --cross-eval-sequences 16 --eval-batch 16 --label gpu-pair-c8 \
  --model-overrides '{"chunk_size": 8, "memory_capacity": 131200, "memory_query_block": 128}' \
  --out "$out/recall_gpu.json" 2>&1 | tee -a "$out/rung2.log"
