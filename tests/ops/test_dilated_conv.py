"""The conv1d-based multi-resolution convolution against the explicit sum in float64."""

from __future__ import annotations

import pytest
import torch

from horizonlm.ops.dilated_conv import buffer_length, multires_causal_conv
from horizonlm.ops.reference import causal_conv_ref


@pytest.mark.parametrize("length,kernel_size,levels", [(1, 3, 3), (5, 3, 3), (17, 4, 3), (9, 3, 1)])
def test_matches_explicit_sum(length: int, kernel_size: int, levels: int) -> None:
    g = torch.Generator().manual_seed(length * 10 + kernel_size)
    batch, channels = 2, 5
    pad = buffer_length(kernel_size, levels)
    x = torch.randn(batch, length, channels, generator=g, dtype=torch.float64, requires_grad=True)
    buffer = torch.randn(batch, pad, channels, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(levels, channels, kernel_size, generator=g, dtype=torch.float64, requires_grad=True)
    mix = torch.softmax(torch.randn(levels, generator=g, dtype=torch.float64), 0).requires_grad_()
    y_fast, b_fast = multires_causal_conv(x, buffer, weight, mix)
    y_ref, b_ref = causal_conv_ref(x, buffer, weight, mix)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b_fast, b_ref, rtol=0, atol=0)
    g_out = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    g_buf = torch.randn(b_ref.shape, generator=g, dtype=torch.float64)
    inputs = (x, buffer, weight, mix)
    fast = torch.autograd.grad((y_fast * g_out).sum() + (b_fast * g_buf).sum(), inputs)
    ref = torch.autograd.grad((y_ref * g_out).sum() + (b_ref * g_buf).sum(), inputs)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_buffer_length() -> None:
    assert buffer_length(3, 4) == 16
    assert buffer_length(4, 1) == 3
