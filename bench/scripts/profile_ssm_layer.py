"""Kernel-level profile of one SSM sublayer (or the multi-resolution conv) forward + backward at
16 x 8192 x 768 under bf16 autocast: the table says where a layer's time goes.

    PYTHONPATH=src python bench/scripts/profile_ssm_layer.py [s4d|selective|conv] [rows]
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from horizonlm.config import HorizonConfig
from horizonlm.layers.multires_conv import MultiResConv
from horizonlm.layers.ssm import SSMSublayer


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "s4d"
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    cfg = HorizonConfig.preset("base", ssm_kind="selective" if kind == "selective" else "s4d", ssm_recompute=False)
    layer = (MultiResConv(cfg.d_model, cfg.conv_kernel, cfg.conv_levels) if kind == "conv" else SSMSublayer(cfg)).cuda()
    x = torch.randn(16, 8192, cfg.d_model, device="cuda", requires_grad=True)  # (B, L, D)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = layer(x)  # (B, L, D)
        y.float().sum().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"== {kind}: 3 steps ==")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
