"""Probe: does the read's own width dilute the answer at long gaps?

Trains one model on rung 2 of ``horizon bench recall`` (the same task, settings and code), then
scores it at each gap with the memory reading its top K for several K: the trained K and fewer.
If accuracy at long gaps rises as K falls while the answer's entry is still found, the other
entries of the read, more similar to the query as the memory fills, are diluting its value.

    python bench/scripts/recall_topk_probe.py --out probe.json

bench/results/recall_topk_cpu.json was made at commit f85616f with ``--model horizon_pair_memory``,
a memory retired since (the induction memory, ``horizon``, replaced it); the default is now the
default model.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from horizonlm.bench.common import environment
from horizonlm.bench.recall import (
    RecallConfig,
    make_fillers,
    make_model,
    optim_settings,
    plan_runs,
    rung2_task,
)
from horizonlm.bench.recall_train import Budget, train_model
from horizonlm.devices import resolve_device
from horizonlm.errors import HorizonError
from horizonlm.fileio import atomic_write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="horizon")
    parser.add_argument("--overrides", default='{"chunk_size": 8, "memory_capacity": 2100, "memory_query_block": 128}')
    parser.add_argument("--lr", type=float, default=3e-3, help="the rate rung 2's sweep chose on the H200")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--gaps", default="1024,4096,16384")
    parser.add_argument("--reads", default="8,4,2,1", help="top-K values to score with (the first is trained)")
    parser.add_argument("--sequences", type=int, default=32, help="test sequences per gap")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--replace", action="store_true", help="overwrite an existing --out")
    args = parser.parse_args()
    if Path(args.out).exists() and not args.replace:
        parser.error(f"{args.out} exists; pass --replace to overwrite it, or choose another --out")
    try:
        reads = [int(k) for k in args.reads.split(",")]
        overrides = {**json.loads(args.overrides), "memory_topk": reads[0]}
        cfg = RecallConfig(rungs="2", models=args.model, cross_width=64, cross_pairs=16, vocab_size=512,
                           window=256, train_gaps="0,128,512", gaps=args.gaps, lrs=str(args.lr), steps=args.steps,
                           minutes=0, batch_size=32, cross_eval_sequences=args.sequences, eval_batch=32,
                           device=args.device, model_overrides=overrides)
        (plan,) = plan_runs(cfg, None)
        capacity = plan.model_config["memory_capacity"]
        if any(not 1 <= k <= capacity for k in reads):
            raise ValueError(f"--reads must lie in [1, memory_capacity={capacity}], got {args.reads}")
    except (ValueError, HorizonError) as err:  # a bad gap, rate, override or read: say so, train nothing
        parser.error(str(err))
    device = resolve_device(cfg.device)
    task = rung2_task(cfg, make_fillers(cfg, device), device, plan)
    model = make_model(plan, None, cfg.seed, device)
    run = train_model(model, task.sample, task.window, optim_settings(cfg, args.lr), Budget(args.steps, 0), cfg.bf16,
                      cfg.log_every)
    print(json.dumps({"steps": run["steps"], "final_train_loss": run["final_train_loss"]}), flush=True)
    scores = {}
    for k in reads:
        model.memory.top_k = k
        scores[k] = list(task.test(model))
        print(json.dumps({"top_k": k, "accuracy": [c["accuracy"] for c in scores[k]],
                          "entry_hit_rate": [c["entry_hit_rate"] for c in scores[k]]}), flush=True)
    atomic_write_json(args.out, {"trained_top_k": reads[0], "train": run, "scores": scores,
                                 "config": asdict(cfg), "environment": environment()})


if __name__ == "__main__":
    main()
