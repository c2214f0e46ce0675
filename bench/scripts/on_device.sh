#!/usr/bin/env bash
# Runs the `horizon` commands listed in a file (one per line, '#' comments) on the lent GPU
# machine, each bounded by what is left of SECONDS_BUDGET (default 560) from the script's start,
# then packs what they wrote under bench/results (JSON, PNG) and their logs into OUT.
#   bash bench/scripts/on_device.sh "$OUT" bench/configs/h200_default_model.cmds
# Needs .carry/novels (a copy of the novels corpus) and, for WikiText scores, .carry/wikitext;
# wheels in .carry/wheels (the peers' libraries: fla-core, flash-linear-attention, einops) are
# installed first, without network; set HORIZON_COMMIT to the commit of the working tree sent
# (its .git there can be older).
set -u
out=$1 commands=$2
budget=${SECONDS_BUDGET:-560}
export PYTHONPATH=src PYTHONUNBUFFERED=1 HORIZON_COMMIT=${HORIZON_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
# Compiled kernels and autotune results kept under runs/ (ignored, kept between the calls of one
# warm machine): the GLA peer's fla kernels autotune about 800 configurations on first use (10
# minutes were not enough in session 21). Triton writes each finished tuning to
# TRITON_CACHE_DIR/<hash>/<kernel>.autotune.json (TRITON_CACHE_AUTOTUNING; fla asks for it too),
# keyed by the Triton build, the kernel's source and its arguments' shapes and dtypes, not by the
# machine. So those files come back in OUT/triton_autotune.tgz and, copied to .carry/, are
# unpacked here on the next fresh machine: a kernel tuned once is only compiled after that.
# TRITON_PRINT_AUTOTUNING logs each tuning's time.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/runs/cache/triton} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/runs/cache/inductor}
export TRITON_CACHE_AUTOTUNING=1 TRITON_PRINT_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"
[ -f .carry/triton_autotune.tgz ] && tar -xzf .carry/triton_autotune.tgz -C "$TRITON_CACHE_DIR"
mkdir -p "$out/logs"
marker=$(mktemp) && touch "$marker"  # results written after this are brought back
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/logs/gpu.txt" 2>&1
if compgen -G ".carry/wheels/*.whl" > /dev/null; then
  python3 -m pip install --no-deps --no-index .carry/wheels/*.whl > "$out/logs/pip.log" 2>&1
fi
[ -f runs/data/novels/meta.json ] || python3 -m horizonlm.cli prepare novels --source .carry/novels \
  --out runs/data/novels --no-progress > "$out/logs/prepare.log" 2>&1
n=0
while IFS= read -r line; do
  [[ -z "$line" || "$line" == \#* ]] && continue
  n=$((n + 1)) left=$((budget - SECONDS - 15))
  if ((left < 10)); then echo "not run (budget spent): $line" >> "$out/logs/skipped.txt"; continue; fi
  echo "[$SECONDS s] horizon $line" >> "$out/logs/commands.txt"
  eval "timeout $left python3 -m horizonlm.cli $line" > "$out/logs/$n.log" 2>&1
  echo "[$SECONDS s] exit $?" >> "$out/logs/commands.txt"
done < "$commands"
df -h . /tmp > "$out/logs/disk.txt" 2>&1  # a full disk stops a run's checkpoint (session 13)
du -sh runs/* >> "$out/logs/disk.txt" 2>&1
for run in runs/*/*/log.jsonl; do  # the training logs of the runs made here
  [ -f "$run" ] && mkdir -p "$out/logs/$(dirname "$run")" && cp "$run" "$(dirname "$run")/config.json" "$out/logs/$(dirname "$run")/"
done
tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$out/logs"
(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar -czf "$out/triton_autotune.tgz" -T -)
find bench/results -type f -newer "$marker" -exec cp {} "$out/" \;
ls -la "$out"
