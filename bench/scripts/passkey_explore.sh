#!/usr/bin/env bash
# Four passkey recipes side by side, two per GPU on GPUs $1 and $2, each trained for the
# config's budget and then scored on the 4-key grid up to 64K and the single-key grid (all
# lengths). Results: $3/passkey-<name>.json. Run from the repository root with prepared novels.
#   A  configs/passkey.yaml as written (chunk 64; keys in the question's window or the one before)
#   B  A with chunk 16 (a chunk summary sits closer to the key it must hold)
#   C  every episode in one window (always a write gradient), chunk 16
#   D  every episode in one window, chunk 64
set -euo pipefail
gpu_a=$1 gpu_b=$2 out=$3
horizon="python3 -m horizonlm.cli"
run() {  # name gpu overrides...
  local name=$1 gpu=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu $horizon train --config configs/passkey.yaml --out runs/pk-$name "$@" > "$out/train-$name.log" 2>&1
  CUDA_VISIBLE_DEVICES=$gpu $horizon passkey --checkpoint runs/pk-$name --source .carry/novels --label "$name" \
    --keys 4 --max-length 65536 --out "$out/passkey-$name.json" >> "$out/train-$name.log" 2>&1
  CUDA_VISIBLE_DEVICES=$gpu $horizon passkey --checkpoint runs/pk-$name --source .carry/novels --label "$name" \
    --out "$out/passkey-$name.json" >> "$out/train-$name.log" 2>&1
}
run A "$gpu_a" &
run B "$gpu_a" --model-overrides '{"memory_capacity": 65536, "chunk_size": 16}' &
run C "$gpu_b" --model-overrides '{"memory_capacity": 65536, "chunk_size": 16}' --retrieval-every 1 --reset-every 1 &
run D "$gpu_b" --retrieval-every 1 --reset-every 1 &
wait
