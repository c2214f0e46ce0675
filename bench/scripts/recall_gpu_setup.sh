# Sourced by the recall GPU scripts (recall_*gpu*.sh OUT): names the results folder `out` and the
# `horizon` command, records the GPU in OUT/gpu.txt, and exports HORIZON_COMMIT, which the entries
# record as their commit: set it where the checkout's .git is not the code that runs (a copied
# working tree); otherwise `git rev-parse HEAD` is used. On the lent GPU machine the copy's .git
# is older than the working tree (session 8 recorded afe8c9e for later code): pass the hash from
# your own checkout, e.g. HORIZON_COMMIT=<output of git rev-parse HEAD here>, never $(git ...) there.
out=$1
horizon="python3 -m horizonlm.cli"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt"
export HORIZON_COMMIT=${HORIZON_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
