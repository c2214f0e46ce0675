"""The count cache's lookup a token at a time, as a decoder asks it, on this machine's CPU: the
batched path (``count_cache_call`` with a call of one token) against the host structure the
decoder uses (``decode_counts.HostCounts``), after 1K, 64K and 1M bytes of a prepared corpus's
test split, one stream, one thread; with the host structure's set-up and hand-back times.

    PYTHONPATH=src python bench/scripts/count_lookup_times.py runs/data/novels OUT.json [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from horizonlm.bench.common import environment
from horizonlm.bench.quality import ABLATIONS
from horizonlm.config import HorizonConfig
from horizonlm.data.stream import load_meta, open_split
from horizonlm.decode_counts import HostCounts
from horizonlm.fileio import atomic_write_json, refuse_existing
from horizonlm.ops.count_cache import count_cache_call, empty_tables
from horizonlm.state import CountCacheState

STEPS = 300
CAPACITY = HorizonConfig.count_capacity  # the default's blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a prepared corpus (horizon prepare)")
    parser.add_argument("out")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    out, data = refuse_existing(args.out, args.overwrite), args.data
    torch.set_num_threads(1)
    lengths = ABLATIONS["horizon_count_cache"][1]["count_lengths"]
    stream = open_split(data, "test")  # (T,)
    vocab = int(load_meta(data)["vocab_size"])
    rows = []
    for context in (1024, 65536, 1 << 20):
        tokens = torch.from_numpy(np.array(stream[:context + STEPS], dtype=np.int64)).view(1, -1)  # (1, T)
        tables, tail = empty_tables(1), torch.full((1, max(lengths)), -1, dtype=torch.int64)  # (1, span)
        for start in range(0, context, 8192):
            piece = tokens[:, start:min(start + 8192, context)]  # (1, <= 8192)
            _, tables, tail = count_cache_call(tables, tail, start, piece, lengths, vocab, CAPACITY)
        began = time.perf_counter()
        host = HostCounts(CountCacheState(tables, tail=tail, pos=context), lengths, vocab, CAPACITY)
        set_up = time.perf_counter() - began
        began = time.perf_counter()
        for t in range(context, context + STEPS):
            host.step([int(tokens[0, t])])
        host_ms = (time.perf_counter() - began) / STEPS * 1e3
        began = time.perf_counter()
        for t in range(context, context + STEPS):
            _, tables, tail = count_cache_call(tables, tail, t, tokens[:, t:t + 1], lengths, vocab, CAPACITY)
        batched_ms = (time.perf_counter() - began) / STEPS * 1e3
        began = time.perf_counter()
        host.state()
        hand_back = time.perf_counter() - began
        rows.append({"context": context, "pairs_held": int(tables.items.shape[1] + tables.recent_items.shape[1]),
                     "batched_ms_per_token": batched_ms, "host_ms_per_token": host_ms,
                     "host_set_up_seconds": set_up, "host_state_seconds": hand_back})
        print(json.dumps(rows[-1]))
    result = {"environment": environment(), "data": str(data), "lengths": list(lengths), "capacity": CAPACITY,
              "steps": STEPS, "threads": 1, "rows": rows}
    atomic_write_json(out, result)


if __name__ == "__main__":
    main()
