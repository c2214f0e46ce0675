#!/usr/bin/env bash
# Rung 3 of issue #12 on one GPU, first half: trains configs/passkey_pair.yaml three ways side
# by side (HorizonLM with the tied query, with an untied one, and the transformer on the same
# recipe, each `--max-minutes 5`), packs each model's weights as OUT/ck-NAME.tar.gz (for the long
# prompts of passkey_gpu_long.sh), then asks each for keys: HorizonLM at 1K-256K with 1 and 4
# keys (read as trained, and reading the best entry only), the transformer inside its 2K
# training window, until PASSKEY_SECONDS (default 550) after the start (a cell's results are
# saved as it ends). Results, plots and logs: OUT/results.tar.gz.
#   bash bench/scripts/passkey_gpu.sh OUT [flags for every `horizon train`]
set -euo pipefail
source bench/scripts/recall_gpu_setup.sh "$1"
shift
extra=("$@")
work=runs/pk-gpu && mkdir -p "$work"
$horizon prepare novels --source .carry/novels --out runs/data/novels > "$work/prepare.log" 2>&1
train() {  # name flags...
  local name=$1; shift
  $horizon train --config configs/passkey_pair.yaml --out "runs/pk-$name" "$@" "${extra[@]}" > "$work/train-$name.log" 2>&1
  python3 -c "import sys; from horizonlm.checkpoint import load_checkpoint, save_checkpoint as save
c = load_checkpoint(sys.argv[1]); save(sys.argv[2], c.info['step'], c.model,
     {k: c.info[k] for k in ('tokenizer', 'train_config', 'tokens_seen', 'data')})" "runs/pk-$name" "runs/ck-$name"
  tar -czf "$out/ck-$name.tar.gz" -C runs "ck-$name"  # the weights without the optimizer and carried state
}
train tied &
train untied --model-overrides '{"memory_tie_query": false}' &
train transformer --model transformer --model-overrides '{}' &
wait
deadline=$((${PASSKEY_SECONDS:-550} - 10))  # the asking stops in time to pack the results
ask() {  # name label keys lengths flags...
  local name=$1 label=$2 keys=$3 lengths=$4 left=$((deadline - SECONDS)); shift 4
  if ((left < 5)); then echo "passkey $label $keys keys: not run (PASSKEY_SECONDS spent)" >> "$work/passkey-$name.log"; return; fi
  timeout $left $horizon passkey --checkpoint "runs/pk-$name" --source .carry/novels --label "$label" --keys "$keys" \
    --lengths "$lengths" --trials 4 --batch 4 --out "$work/passkey-$name.json" --no-progress "$@" \
    >> "$work/passkey-$name.log" 2>&1 || echo "passkey $label $keys keys: exit $?" >> "$work/passkey-$name.log"
}
long=1024,4096,16384,65536,262144
(ask tied tied-read1 1 $long --read-topk 1; ask tied tied-read1 4 $long --read-topk 1
 ask tied tied 1 $long; ask tied tied 4 $long) &
(ask untied untied-read1 1 $long --read-topk 1; ask untied untied 1 $long; ask untied untied-read1 4 65536 --read-topk 1) &
(ask transformer transformer 1 1024,2048; ask transformer transformer 4 1024,2048) &
wait
cp "$out/gpu.txt" "$work/" && tar -czf "$out/results.tar.gz" -C runs pk-gpu $(cd runs && ls -d pk-*/log.jsonl pk-*/config.json)
