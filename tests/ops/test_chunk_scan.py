"""The chunk-state scan: the torch twin against complex arithmetic, and the Triton kernel (run by
Triton's CPU interpreter, where triton is installed) against the twin, with gradients."""

from __future__ import annotations

import textwrap

import torch

from horizonlm.ops.chunk_scan import chunk_scan_torch

from .triton_interpreter import assert_passes_in_interpreter


def _inputs(heads: int, batch: int, windows: int, modes: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(heads, batch, windows, 2 * modes, generator=g, dtype=dtype)  # (H, B, W, 2N)
    radius = torch.rand(heads, modes, generator=g, dtype=dtype) * 0.9  # (H, N)
    angle = torch.rand(heads, modes, generator=g, dtype=dtype) * 6.0  # (H, N)
    a = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)  # (H, N, 2)
    x0 = torch.randn(heads, batch, 2 * modes, generator=g, dtype=dtype)  # (H, B, 2N)
    return z, a, x0


def test_torch_twin_is_the_complex_recurrence() -> None:
    z, a, x0 = _inputs(3, 2, 5, 4, torch.float64, seed=0)
    x_in, x_end = chunk_scan_torch(z, a, x0)
    ac = torch.view_as_complex(a).unsqueeze(1)  # (H, 1, N)
    x = torch.complex(x0[..., :4], x0[..., 4:])  # (H, B, N)
    for w in range(5):
        torch.testing.assert_close(x_in[:, :, w], torch.cat([x.real, x.imag], dim=-1))
        x = ac * x + torch.complex(z[:, :, w, :4], z[:, :, w, 4:])  # (H, B, N)
    torch.testing.assert_close(x_end, torch.cat([x.real, x.imag], dim=-1))


_TRITON_CHECK = textwrap.dedent("""
    import torch
    from horizonlm.ops.chunk_scan import chunk_scan_torch, chunk_scan_triton
    torch.manual_seed(0)
    for heads, batch, windows, modes in [(3, 2, 5, 4), (2, 3, 1, 8), (5, 1, 7, 3)]:
        z = torch.randn(heads, batch, windows, 2 * modes, requires_grad=True)
        a = (torch.randn(heads, modes, 2) * 0.5).requires_grad_()
        x0 = torch.randn(heads, batch, 2 * modes, requires_grad=True)
        g_in = torch.randn(heads, batch, windows, 2 * modes)
        g_end = torch.randn(heads, batch, 2 * modes)
        outs = []
        for fn in (chunk_scan_torch, chunk_scan_triton):
            x_in, x_end = fn(z, a, x0)
            grads = torch.autograd.grad((x_in * g_in).sum() + (x_end * g_end).sum(), (z, a, x0))
            outs.append((x_in, x_end) + grads)
        for got, want in zip(outs[1], outs[0]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print("ok")
""")


def test_triton_kernel_matches_twin_in_interpreter() -> None:
    assert_passes_in_interpreter(_TRITON_CHECK, timeout=300)
