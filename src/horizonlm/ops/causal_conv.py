"""Depthwise causal convolution over a stream, with the P inputs before the window in a buffer:

    y[b, t, d] = sum_{j=0..P} kernel[d, j] * full[b, t + j, d],   full = cat([buffer, x], dim=1)

x: (B, L, D), buffer: (B, P, D), kernel: (D, P+1); tap P multiplies the current input and tap 0
the input P steps back. On the GPU fused Triton kernels compute it straight from x and buffer in
their (B, L, D) / (B, P, D) layouts, D contiguous: no ``full`` copy and no transpose, which is where
``F.conv1d`` on ``cat(...).transpose(1, 2)`` spends most of its time. A program owns a tile of
BLOCK_T tokens by BLOCK_D channels and reads its P-token halo as P+1 shifted tile loads (served
by L1/L2 after the first), taking positions before 0 from the buffer; sums are float32.

The backward is one kernel over the positions s of ``full``:
``grad_full[s] = sum_j kernel[j] * grad_y[s - j]`` (the anti-causal twin of the forward, stored
into grad x for s >= P and grad buffer for s < P), and in the same pass, from the same loads,
``grad_kernel[d, j] = sum_{b, s} grad_y[b, s - j, d] * full[b, s, d]``. The kernel gradient is
deterministic: each program writes its float32 partial sums (P+1, BLOCK_D) to its own slot and a
second reduction (``torch.sum`` over the slots) adds them, instead of atomics whose order varies.
The slots hold B * ceil((P+L)/BLOCK_T) * (P+1) * D floats (54 MB at 16 x 8192 x 768, P = 16,
BLOCK_T = 128, against 600 MB of bf16 that the backward must move anyway).

``causal_depthwise_conv_torch`` is the twin (``F.conv1d`` on the concatenated, transposed input),
used on the CPU, in float64 and as the kernels' reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from horizonlm.devices import autocast_dtype

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def causal_depthwise_conv_torch(x: Tensor, buffer: Tensor, kernel: Tensor) -> Tensor:
    """The formula by ``F.conv1d`` (cuDNN on the GPU; autocast applies to it as to any conv).

    x: (B, L, D), buffer: (B, P, D), kernel: (D, P+1). Returns y (B, L, D).
    """
    full = torch.cat([buffer, x], dim=1)  # (B, P+L, D)
    y = F.conv1d(full.transpose(1, 2), kernel.unsqueeze(1), groups=kernel.shape[0])  # (B, D, L)
    return y.transpose(1, 2)  # (B, L, D)


if triton is not None:

    @triton.jit
    def _conv_forward(x_ptr, buf_ptr, kt_ptr, y_ptr, length, channels, PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_D: tl.constexpr):
        pid_t = tl.program_id(0)
        pid_d = tl.program_id(1)
        row = tl.program_id(2).to(tl.int64)
        t0 = pid_t * BLOCK_T
        local = tl.arange(0, BLOCK_T)
        t = t0 + local
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < channels
        x_tile = x_ptr + (row * length + t0) * channels
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for j in tl.static_range(PAD + 1):
            k = tl.load(kt_ptr + j * channels + d, mask=d_ok, other=0.0).to(tl.float32)
            src = t + (j - PAD)
            ok = (src >= 0) & (src < length)
            v = tl.load(x_tile + (local + (j - PAD))[:, None] * channels + d[None, :],
                        mask=ok[:, None] & d_ok[None, :], other=0.0)
            acc += k[None, :] * v.to(tl.float32)
        if t0 < PAD:
            buf_row = buf_ptr + row * PAD * channels
            for j in tl.static_range(PAD):
                k = tl.load(kt_ptr + j * channels + d, mask=d_ok, other=0.0).to(tl.float32)
                src = t + (j - PAD)
                v = tl.load(buf_row + (src + PAD)[:, None] * channels + d[None, :],
                            mask=(src < 0)[:, None] & d_ok[None, :], other=0.0)
                acc += k[None, :] * v.to(tl.float32)
        y_tile = y_ptr + (row * length + t0) * channels
        tl.store(y_tile + local[:, None] * channels + d[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(t < length)[:, None] & d_ok[None, :])

    @triton.jit
    def _conv_backward(gy_ptr, x_ptr, buf_ptr, kt_ptr, gx_ptr, gbuf_ptr, gk_ptr, length, channels, n_tiles,
                       PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_s = tl.program_id(0)
        pid_d = tl.program_id(1)
        row = tl.program_id(2).to(tl.int64)
        s0 = pid_s * BLOCK_T
        local = tl.arange(0, BLOCK_T)
        s = s0 + local
        i = s - PAD
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < channels
        x_ok = ((i >= 0) & (i < length))[:, None] & d_ok[None, :]
        x_tile = x_ptr + (row * length + s0 - PAD) * channels
        tile = local[:, None] * channels + d[None, :]
        f = tl.load(x_tile + tile, mask=x_ok, other=0.0).to(tl.float32)
        buf_ok = (s < PAD)[:, None] & d_ok[None, :]
        if s0 < PAD:
            f += tl.load(buf_ptr + row * PAD * channels + s[:, None] * channels + d[None, :], mask=buf_ok,
                         other=0.0).to(tl.float32)
        gy_tile = gy_ptr + (row * length + s0) * channels
        gk_slot = gk_ptr + ((row * n_tiles + pid_s) * (PAD + 1)) * channels
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for j in tl.static_range(PAD + 1):
            k = tl.load(kt_ptr + j * channels + d, mask=d_ok, other=0.0).to(tl.float32)
            u = s - j
            g = tl.load(gy_tile + (local - j)[:, None] * channels + d[None, :],
                        mask=((u >= 0) & (u < length))[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc += k[None, :] * g
            tl.store(gk_slot + j * channels + d, tl.sum(g * f, axis=0), mask=d_ok)
        gx_tile = gx_ptr + (row * length + s0 - PAD) * channels
        tl.store(gx_tile + tile, acc.to(gx_ptr.dtype.element_ty), mask=x_ok)
        if s0 < PAD:
            tl.store(gbuf_ptr + row * PAD * channels + s[:, None] * channels + d[None, :],
                     acc.to(gbuf_ptr.dtype.element_ty), mask=buf_ok)


# Tiles chosen by a sweep on one H200 (bench/scripts/conv_tune.py; forward + backward at
# 16 x 8192 x 768, P = 16, bf16): 128 tokens x 32 channels with 4 warps took 2.66 ms, the best of
# 18 (128 x 64 x 8 warps: 3.33 ms; 64 x 128 x 4: 2.87 ms; some large tiles spill: 25-30 ms);
# cuDNN through F.conv1d on the transposed copy: 8.85 ms.
_BLOCK_T = 128
_BLOCK_D = 32
_WARPS = 4


def _block_t(positions: int, block_t: int | None) -> int:
    """The token tile: ``_BLOCK_T``, shrunk to a power of two >= 16 covering short calls (decode),
    so L = 1 does not run a 128-row tile; a handful of sizes, so a handful of compilations."""
    if block_t is not None:
        return block_t
    return max(16, min(_BLOCK_T, triton.next_power_of_2(positions)))


class _TritonCausalConv(torch.autograd.Function):
    """The Triton kernels under autograd; the kernel gradient's partial sums are added here."""

    @staticmethod
    def forward(ctx, x: Tensor, buffer: Tensor, kernel: Tensor, out_dtype: torch.dtype, block_t: int | None,
                block_d: int, num_warps: int) -> Tensor:
        batch, length, channels = x.shape
        pad = buffer.shape[1]
        kt = kernel.detach().t().to(torch.float32).contiguous()  # (P+1, D): coalesced tap rows
        y = torch.empty(batch, length, channels, device=x.device, dtype=out_dtype)  # (B, L, D)
        bt = _block_t(length, block_t)
        grid = (triton.cdiv(length, bt), triton.cdiv(channels, block_d), batch)
        _conv_forward[grid](x, buffer, kt, y, length, channels, PAD=pad, BLOCK_T=bt, BLOCK_D=block_d,
                            num_warps=num_warps)
        ctx.save_for_backward(x, buffer, kt)
        ctx.kernel_dtype = kernel.dtype
        ctx.blocks = (block_t, block_d, num_warps)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, buffer, kt = ctx.saved_tensors
        block_t, block_d, num_warps = ctx.blocks
        batch, length, channels = x.shape
        pad = buffer.shape[1]
        grad_y = grad_y.contiguous()  # (B, L, D)
        grad_x = torch.empty_like(x)  # (B, L, D)
        grad_buffer = torch.empty_like(buffer)  # (B, P, D)
        bt = _block_t(pad + length, block_t)
        n_tiles = triton.cdiv(pad + length, bt)
        partial = torch.empty(batch * n_tiles, pad + 1, channels, device=x.device,
                              dtype=torch.float32)  # (B*tiles, P+1, D)
        grid = (n_tiles, triton.cdiv(channels, block_d), batch)
        _conv_backward[grid](grad_y, x, buffer, kt, grad_x, grad_buffer, partial, length, channels, n_tiles,
                             PAD=pad, BLOCK_T=bt, BLOCK_D=block_d, num_warps=num_warps)
        grad_kernel = partial.sum(0).t().to(ctx.kernel_dtype)  # (D, P+1)
        return grad_x, grad_buffer, grad_kernel, None, None, None, None


@torch.compiler.disable
def causal_depthwise_conv_triton(x: Tensor, buffer: Tensor, kernel: Tensor, out_dtype: torch.dtype | None = None,
                                 block_t: int | None = None, block_d: int = _BLOCK_D,
                                 num_warps: int = _WARPS) -> Tensor:
    """The same as :func:`causal_depthwise_conv_torch` by the Triton kernels, on any device Triton
    runs on (its CPU interpreter included). Inputs of any float dtype (they may differ), read as
    they are and summed in float32; y in ``out_dtype`` (x's dtype by default). ``block_t``,
    ``block_d`` and ``num_warps`` override the tiling, for tests (small tiles cross many tile
    edges) and for timing sweeps. Left out of torch.compile, as the Triton scan is."""
    if triton is None:
        raise RuntimeError("causal_depthwise_conv_triton needs the triton package")
    return _TritonCausalConv.apply(x.contiguous(), buffer.contiguous(), kernel, out_dtype or x.dtype, block_t,
                                   block_d, num_warps)


def causal_depthwise_conv(x: Tensor, buffer: Tensor, kernel: Tensor) -> Tensor:
    """Triton on a CUDA device (float32, float16, bfloat16); the torch twin otherwise (CPU, float64).

    Under CUDA autocast y comes out in the autocast dtype, as ``F.conv1d`` would give it, but the
    kernels read float32 inputs directly instead of casting copies first; gradients come back in
    the inputs' own dtypes.
    """
    if triton is None or not x.is_cuda or torch.float64 in (x.dtype, buffer.dtype, kernel.dtype):
        return causal_depthwise_conv_torch(x, buffer, kernel)
    return causal_depthwise_conv_triton(x, buffer, kernel, autocast_dtype("cuda") or x.dtype)


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def check_causal_conv(device: torch.device) -> dict[str, float]:
    """Relative errors of the dispatching convolution (Triton on a CUDA ``device``): outputs and the
    gradients of x, buffer and kernel, with bfloat16, float32, and float32 inputs under bf16
    autocast, over a length and width that are not tile multiples. The reference is the float64
    twin on the same inputs (rounded to the dtype first), so only the arithmetic is measured;
    ``*_twin`` keys give the cuDNN twin's own errors in that dtype, the yardstick for the others."""
    if triton is None:
        raise RuntimeError("check_causal_conv needs the triton package")
    g = torch.Generator(device=device).manual_seed(0)
    batch, length, channels, pad = 3, 1000, 200, 16
    x64 = torch.randn(batch, length, channels, generator=g, device=device, dtype=torch.float64)  # (B, L, D)
    buf64 = torch.randn(batch, pad, channels, generator=g, device=device, dtype=torch.float64)  # (B, P, D)
    k64 = torch.randn(channels, pad + 1, generator=g, device=device, dtype=torch.float64) / 4  # (D, P+1)
    gy = torch.randn(batch, length, channels, generator=g, device=device, dtype=torch.float64)  # (B, L, D)
    names = ("y", "grad_x", "grad_buffer", "grad_kernel")

    def run(fn, dtype: torch.dtype, compute: torch.dtype, autocast: bool) -> tuple[Tensor, ...]:
        inputs = [t.to(dtype).to(compute).requires_grad_() for t in (x64, buf64, k64)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = fn(*inputs)  # (B, L, D)
        return (y, *torch.autograd.grad((y.double() * gy).sum(), inputs))

    out: dict[str, float] = {}
    for label, dtype, autocast in (("f32", torch.float32, False), ("bf16", torch.bfloat16, False),
                                   ("autocast", torch.float32, True)):
        ref = run(causal_depthwise_conv_torch, dtype, torch.float64, False)
        fast = run(causal_depthwise_conv, dtype, dtype, autocast)
        twin = run(causal_depthwise_conv_torch, dtype, dtype, autocast)
        for name, a, t, r in zip(names, fast, twin, ref):
            out[f"{label}_{name}"] = _rel(a, r)
            out[f"{label}_{name}_twin"] = _rel(t, r)
    return out
