"""Training-step time of whole models at one length (forward + backward + AdamW, bf16 autocast),
to choose the SSM defaults before the full ``horizon bench speed`` table.

    PYTHONPATH=src python bench/scripts/step_times.py OUT.json [--compile]
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from horizonlm.baseline import TransformerLM
from horizonlm.bench.common import environment, median, time_cuda
from horizonlm.config import HorizonConfig, TransformerConfig
from horizonlm.model import HorizonLM

VARIANTS = {
    "horizon_s4d_gated_T128": dict(),
    "horizon_s4d_gated_T64": dict(ssm_chunk=64),
    "horizon_s4d_ungated": dict(ssm_gate="none", mlp_hidden=1792),
    "horizon_selective_T128": dict(ssm_kind="selective"),
    "horizon_no_ssm": dict(use_ssm=False),
    "horizon_no_conv": dict(use_conv=False),
    "transformer": None,
}


def step_time(model: torch.nn.Module, batch: int, length: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, 256, (batch, length + 1), device="cuda")  # (B, L+1)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = model(tokens[:, :-1])  # (B, L, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return median(time_cuda(step, 3, 6))


def main() -> None:
    out_path, compiled = sys.argv[1], "--compile" in sys.argv
    batch, length = 16, 8192
    rows = {}
    for name, overrides in VARIANTS.items():
        torch.manual_seed(0)
        if overrides is None:
            model = TransformerLM(TransformerConfig.preset("base")).cuda()
        else:
            model = HorizonLM(HorizonConfig.preset("base", **overrides)).cuda()
        if compiled:
            for i, block in enumerate(model.blocks):
                model.blocks[i] = torch.compile(block)
        torch.cuda.reset_peak_memory_stats()
        try:
            seconds = step_time(model, batch, length)
            rows[name] = {"step_s": seconds, "tokens_per_s": batch * length / seconds,
                          "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                          "parameters": sum(p.numel() for p in model.parameters())}
        except torch.OutOfMemoryError:
            rows[name] = {"error": "out of memory"}
        print(name, rows[name], flush=True)
        del model
        torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump({"environment": environment(), "batch": batch, "length": length, "compiled": compiled,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
