#!/usr/bin/env bash
# configs/passkey.yaml for four models, one per GPU (0-3), each alone on its GPU: HorizonLM,
# HorizonLM without the memory, without the supervisor, and the transformer baseline. Each is
# scored on the 4-key grid up to 64K, then the single-key grid (the transformer up to 64K: it
# is trained on 4K windows and its 1M-token prompts cost minutes each). Results: $1/passkey-<name>.json.
# Extra arguments go to every `horizon train` (e.g. --max-minutes 4).
set -euo pipefail
out=$1; shift
horizon="python3 -m horizonlm.cli"
run() {  # name gpu max_length train-overrides...
  local name=$1 gpu=$2 longest=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu $horizon train --config configs/passkey.yaml --out runs/pk-$name "$@" > "$out/train-$name.log" 2>&1
  CUDA_VISIBLE_DEVICES=$gpu $horizon passkey --checkpoint runs/pk-$name --source .carry/novels --label "$name" \
    --keys 4 --max-length 65536 --out "$out/passkey-$name.json" >> "$out/train-$name.log" 2>&1
  CUDA_VISIBLE_DEVICES=$gpu $horizon passkey --checkpoint runs/pk-$name --source .carry/novels --label "$name" \
    --max-length "$longest" --out "$out/passkey-$name.json" >> "$out/train-$name.log" 2>&1
}
run horizon 0 0 "$@" &
run horizon_no_memory 1 0 --model-overrides '{"memory_capacity": 16384, "use_memory": false}' "$@" &
run horizon_no_supervisor 2 0 --model-overrides '{"memory_capacity": 16384, "use_supervisor": false}' "$@" &
run transformer 3 65536 --model transformer --model-overrides '{}' "$@" &
wait
