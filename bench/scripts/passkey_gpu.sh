#!/usr/bin/env bash
# Rung 3 of issue #12 on one GPU: trains configs/passkey_pair.yaml (HorizonLM) and the
# transformer on the same recipe at two learning rates (1e-3, 6e-3), side by side on one GPU,
# packs HorizonLM's weights as OUT/ck-horizon.tar.gz (for passkey_gpu_finish.sh), then asks: the
# transformers inside their 2K training window (1 and 4 keys), HorizonLM as trained to 256K
# (1 key), and HorizonLM reading its best entry only (--read-topk 1) from 1K to 1M tokens, 1 key
# then 4 keys, until PASSKEY_SECONDS (default 550) after the start (each cell is saved as it
# ends). Results, plots and logs: OUT/results.tar.gz.
#   bash bench/scripts/passkey_gpu.sh OUT [flags for every `horizon train`]
set -euo pipefail
source "$(dirname "$0")/recall_gpu_setup.sh" "$1"
source "$(dirname "$0")/passkey_gpu_asking.sh"
shift
extra=("$@")
prepare
train() {  # name flags...
  local name=$1; shift
  $horizon train --config configs/passkey_pair.yaml --out "runs/pk-$name" "$@" "${extra[@]}" > "$work/train-$name.log" 2>&1
}
train horizon &
train transformer-lr1e-3 --model transformer --model-overrides '{}' --lr 0.001 &
train transformer-lr6e-3 --model transformer --model-overrides '{}' --lr 0.006 &
wait
python3 bench/scripts/weights_only.py runs/pk-horizon runs/ck-horizon
tar -czf "$out/ck-horizon.tar.gz" -C runs ck-horizon
(ask transformer-lr1e-3 pk-transformer-lr1e-3 transformer-lr1e-3 1 1024,2048
 ask transformer-lr1e-3 pk-transformer-lr1e-3 transformer-lr1e-3 4 1024,2048
 ask transformer-lr6e-3 pk-transformer-lr6e-3 transformer-lr6e-3 1 1024,2048
 ask transformer-lr6e-3 pk-transformer-lr6e-3 transformer-lr6e-3 4 1024,2048
 ask horizon pk-horizon horizon 1 1024,4096,16384,65536,262144) &
(ask horizon-read1 pk-horizon horizon-read1 1 1024,4096,16384,65536,262144,1048576 --read-topk 1
 ask horizon-read1 pk-horizon horizon-read1 4 1024,4096,16384,65536,262144,1048576 --read-topk 1) &
wait
pack
