"""The depthwise causal convolution: the torch twin against the explicit formula, and the Triton
kernels (run by Triton's CPU interpreter, where triton is installed) against the twin, with the
gradients of x, buffer and kernel, over shapes that cross every tile and buffer edge."""

from __future__ import annotations

import textwrap

import pytest
import torch

from horizonlm.ops.causal_conv import causal_depthwise_conv, causal_depthwise_conv_torch

from .triton_interpreter import assert_passes_in_interpreter


def _explicit(x: torch.Tensor, buffer: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    full = torch.cat([buffer, x], dim=1)  # (B, P+L, D)
    taps = kernel.shape[1]
    return sum(kernel[:, j] * full[:, j : j + x.shape[1]] for j in range(taps))  # (B, L, D)


@pytest.mark.parametrize("batch,length,channels,pad", [(1, 1, 4, 16), (3, 5, 6, 16), (2, 40, 3, 2), (2, 7, 5, 0)])
def test_twin_is_the_formula(batch: int, length: int, channels: int, pad: int) -> None:
    g = torch.Generator().manual_seed(length + pad)
    x = torch.randn(batch, length, channels, generator=g, dtype=torch.float64)  # (B, L, D)
    buffer = torch.randn(batch, pad, channels, generator=g, dtype=torch.float64)  # (B, P, D)
    kernel = torch.randn(channels, pad + 1, generator=g, dtype=torch.float64)  # (D, P+1)
    want = _explicit(x, buffer, kernel)  # (B, L, D)
    torch.testing.assert_close(causal_depthwise_conv_torch(x, buffer, kernel), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(causal_depthwise_conv(x, buffer, kernel), want, rtol=1e-12, atol=1e-12)


_TRITON_CHECK = textwrap.dedent("""
    import torch
    from horizonlm.ops.causal_conv import causal_depthwise_conv_torch, causal_depthwise_conv_triton
    torch.manual_seed(0)
    cases = [  # batch, length, channels, pad, block_t, block_d
        (3, 150, 70, 16, None, None),  # default tiles; L and D not tile multiples
        (1, 37, 20, 16, 8, 16),  # tiles shorter than P: several tiles read the buffer
        (3, 5, 33, 16, None, None),  # L < P
        (2, 1, 64, 16, None, None),  # decode
        (1, 1, 7, 2, None, None),
        (3, 19, 40, 2, 16, 32),
        (2, 9, 5, 0, None, None),  # no buffer
    ]
    for batch, length, channels, pad, block_t, block_d in cases:
        x = torch.randn(batch, length, channels, requires_grad=True)
        buffer = torch.randn(batch, pad, channels, requires_grad=True)
        kernel = torch.randn(channels, pad + 1, requires_grad=True)
        g_out = torch.randn(batch, length, channels)
        kwargs = {"block_t": block_t} if block_d is None else {"block_t": block_t, "block_d": block_d}
        outs = []
        for fn in (causal_depthwise_conv_torch, lambda *a: causal_depthwise_conv_triton(*a, **kwargs)):
            y = fn(x, buffer, kernel)
            assert y.shape == (batch, length, channels) and y.dtype == torch.float32
            outs.append((y, *torch.autograd.grad((y * g_out).sum(), (x, buffer, kernel))))
        for name, got, want in zip(("y", "grad_x", "grad_buffer", "grad_kernel"), outs[1], outs[0]):
            where = f"{name} at B, L, D, P = {batch, length, channels, pad}"
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where}: {m}")
    print("ok")
""")


def test_triton_kernels_match_twin_in_interpreter() -> None:
    assert_passes_in_interpreter(_TRITON_CHECK, timeout=600)
