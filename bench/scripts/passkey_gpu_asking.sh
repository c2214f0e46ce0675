# Sourced by passkey_gpu*.sh after recall_gpu_setup.sh: `prepare` makes runs/data/novels from
# the carried corpus (.carry/novels), logging to runs/pk-gpu; `ask` runs `horizon passkey` on
# runs/pk-NAME (4 trials per cell, side by side) into runs/pk-gpu/passkey-FILE.json, stopping at
# PASSKEY_SECONDS (default 550) after the script's start; `pack` puts the results, plots, logs and
# the runs' logs into OUT/results.tar.gz.
work=runs/pk-gpu && mkdir -p "$work"
deadline=$((${PASSKEY_SECONDS:-550} - 10))  # stop in time to pack the results
ask() {  # file run label keys lengths flags...
  local file=$1 run=$2 label=$3 keys=$4 lengths=$5 left=$((deadline - SECONDS)); shift 5
  if ((left < 5)); then echo "passkey $label $keys keys: not run (PASSKEY_SECONDS spent)" >> "$work/passkey-$file.log"; return; fi
  timeout $left $horizon passkey --checkpoint "runs/$run" --source .carry/novels --label "$label" --keys "$keys" \
    --lengths "$lengths" --trials 4 --batch 4 --out "$work/passkey-$file.json" --no-progress "$@" \
    >> "$work/passkey-$file.log" 2>&1 || echo "passkey $label $keys keys: exit $?" >> "$work/passkey-$file.log"
}
prepare() {
  $horizon prepare novels --source .carry/novels --out runs/data/novels > "$work/prepare.log" 2>&1
}
pack() {
  cp "$out/gpu.txt" "$work/"
  tar -czf "$out/results.tar.gz" -C runs pk-gpu $(cd runs && ls -d pk-*/log.jsonl pk-*/config.json 2>/dev/null)
}
