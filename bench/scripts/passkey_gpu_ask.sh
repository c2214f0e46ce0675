#!/usr/bin/env bash
# Rung 3 of issue #12, the asking that did not fit in passkey_gpu.sh's call: unpacks the
# HorizonLM weights it returned (ck-horizon.tar.gz, carried in .carry/) and asks with 4 keys
# from 1K to 1M tokens, reading the best entry only. Results: OUT/results.tar.gz.
#   bash bench/scripts/passkey_gpu_ask.sh OUT [lengths] [keys]
set -euo pipefail
source bench/scripts/recall_gpu_setup.sh "$1"
mkdir -p runs && tar -xzf .carry/ck-horizon.tar.gz -C runs
source bench/scripts/passkey_gpu_asking.sh
ask horizon-long ck-horizon horizon-read1 "${3:-4}" "${2:-1024,4096,16384,65536,262144,1048576}" --read-topk 1
pack
