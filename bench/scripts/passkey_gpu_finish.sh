#!/usr/bin/env bash
# Rung 3 of issue #12, the part that did not fit in passkey_gpu.sh's call: asks the HorizonLM it
# returned (ck-horizon.tar.gz, carried in .carry/) with 4 keys from 1K to 1M tokens, reading
# the best entry only, while the transformer trains on the same recipe for twice the steps
# (6,000, at 3e-3 and 6e-3, at most 5.5 minutes each) and is then asked inside its 2K window.
# Results: OUT/results.tar.gz.
#   bash bench/scripts/passkey_gpu_finish.sh OUT
set -euo pipefail
source "$(dirname "$0")/recall_gpu_setup.sh" "$1"
source "$(dirname "$0")/passkey_gpu_asking.sh"
mkdir -p runs && tar -xzf .carry/ck-horizon.tar.gz -C runs
prepare
long() {  # lr
  local name=transformer-6k-lr$1
  $horizon train --config configs/passkey_pair.yaml --out "runs/pk-$name" --model transformer --model-overrides '{}' \
    --lr "$1" --steps 6000 --max-minutes 5.5 > "$work/train-$name.log" 2>&1
  ask "$name" "pk-$name" "$name" 1 1024,2048
  ask "$name" "pk-$name" "$name" 4 1024,2048
}
long 3e-3 &
long 6e-3 &
ask horizon-read1-4keys ck-horizon horizon-read1 4 1024,4096,16384,65536,262144,1048576 --read-topk 1 &
wait
pack
