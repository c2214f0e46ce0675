"""Tile sizes of the fused causal-conv kernels against cuDNN (the torch twin), forward +
backward at 16 x 8192 x 768 (P = 16), bf16 inputs, plus the GPU correctness check.

    PYTHONPATH=src python bench/scripts/conv_tune.py
"""

from __future__ import annotations

import torch

from horizonlm.bench.common import median, time_cuda
from horizonlm.ops.causal_conv import causal_depthwise_conv_torch, causal_depthwise_conv_triton, check_causal_conv


def main() -> None:
    device = torch.device("cuda")
    print("check", {k: f"{v:.1e}" for k, v in check_causal_conv(device).items()}, flush=True)
    x = torch.randn(16, 8192, 768, device=device, dtype=torch.bfloat16, requires_grad=True)  # (B, L, D)
    buffer = torch.randn(16, 16, 768, device=device, dtype=torch.bfloat16, requires_grad=True)  # (B, P, D)
    kernel = torch.randn(768, 17, device=device, requires_grad=True)  # (D, P+1)

    def timed(fn) -> float:
        def step() -> None:
            fn().float().sum().backward()
        return median(time_cuda(step, 3, 10)) * 1e3

    print("torch twin (cuDNN)", f"{timed(lambda: causal_depthwise_conv_torch(x, buffer, kernel.bfloat16())):.3f} ms",
          flush=True)
    for block_t in (64, 128, 256):
        for block_d in (32, 64, 128):
            for warps in (4, 8):
                ms = timed(lambda: causal_depthwise_conv_triton(x, buffer, kernel, block_t=block_t, block_d=block_d,
                                                                num_warps=warps))
                print(f"triton block_t={block_t} block_d={block_d} warps={warps}: {ms:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
