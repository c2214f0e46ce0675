"""The chunked S4D map against the explicit recurrence in float64."""

from __future__ import annotations

import pytest
import torch

from horizonlm.ops.reference import s4d_recurrence_ref
from horizonlm.ops.s4d import chunk_operators, discretize, s4d_chunked, s4d_kernel, s4d_step


def _params(channels: int, half: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a_log_re = (torch.rand(channels, half, generator=g, dtype=torch.float64) - 1.5).requires_grad_()
    a_im = (torch.rand(channels, half, generator=g, dtype=torch.float64) * 6).requires_grad_()
    log_dt = (torch.rand(channels, generator=g, dtype=torch.float64) * 4.6 - 6.9).requires_grad_()
    c = torch.randn(channels, half, 2, generator=g, dtype=torch.float64).requires_grad_()
    return a_log_re, a_im, log_dt, c


@pytest.mark.parametrize("length,chunk", [(1, 8), (7, 8), (8, 8), (9, 8), (29, 8), (40, 8), (33, 64), (64, 16)])
def test_scan_matches_recurrence(length: int, chunk: int) -> None:
    batch, channels, half = 2, 3, 4
    a_log_re, a_im, log_dt, c_raw = _params(channels, half, seed=length)
    g = torch.Generator().manual_seed(100 + length)
    u = torch.randn(batch, channels, length, generator=g, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(batch, channels, half, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def run(fast: bool):
        dt_a, a_bar, b_bar = discretize(a_log_re, a_im, log_dt)
        c = torch.view_as_complex(c_raw)
        if fast:
            y, x_end = s4d_chunked(u.transpose(0, 1), dt_a, b_bar, c, x0, chunk)  # (H, B, L)
            return y.transpose(0, 1), torch.view_as_complex(x_end.contiguous())
        return s4d_recurrence_ref(u, a_bar, b_bar, c, torch.view_as_complex(x0))

    y_fast, x_fast = run(True)
    y_ref, x_ref = run(False)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(x_fast, x_ref, rtol=1e-9, atol=1e-10)

    g_out = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    g_state = torch.randn(x_ref.shape, generator=g, dtype=torch.complex128)
    inputs = (u, x0, a_log_re, a_im, log_dt, c_raw)

    def grads(y, x):
        loss = (y * g_out).sum() + (x * g_state.conj()).real.sum()
        return torch.autograd.grad(loss, inputs)

    for gf, gr in zip(grads(y_fast, x_fast), grads(y_ref, x_ref)):
        torch.testing.assert_close(gf, gr, rtol=1e-8, atol=1e-9)


def test_kernel_is_impulse_response() -> None:
    """K[h, l] is the output at l for a unit impulse at 0 from a zero state (DESIGN's formula)."""
    a_log_re, a_im, log_dt, c_raw = _params(2, 3, seed=7)
    dt_a, a_bar, b_bar = discretize(a_log_re, a_im, log_dt)
    c = torch.view_as_complex(c_raw)
    impulse = torch.zeros(1, 2, 12, dtype=torch.float64)
    impulse[..., 0] = 1
    y, _ = s4d_recurrence_ref(impulse, a_bar, b_bar, c, torch.zeros(1, 2, 3, dtype=torch.complex128))
    torch.testing.assert_close(s4d_kernel(dt_a, b_bar, c, 12), y[0], rtol=1e-10, atol=1e-12)


def test_zoh_discretisation() -> None:
    """Abar = exp(dt*A) and Bbar = (Abar - 1)/A, with A = -exp(a_log_re) + i*a_im."""
    a_log_re = torch.tensor([[0.0]], dtype=torch.float64)
    a_im = torch.tensor([[2.0]], dtype=torch.float64)
    log_dt = torch.tensor([-1.0], dtype=torch.float64)
    _, a_bar, b_bar = discretize(a_log_re, a_im, log_dt)
    a = complex(-1.0, 2.0)
    dt = torch.exp(torch.tensor(-1.0, dtype=torch.float64)).item()
    expected = torch.exp(torch.tensor(dt * a, dtype=torch.complex128))
    torch.testing.assert_close(a_bar[0, 0], expected)
    torch.testing.assert_close(b_bar[0, 0], (expected - 1) / a)


def test_step_matches_recurrence() -> None:
    a_log_re, a_im, log_dt, c_raw = _params(3, 4, seed=3)
    _, a_bar, b_bar = discretize(a_log_re, a_im, log_dt)
    c = torch.view_as_complex(c_raw)
    g = torch.Generator().manual_seed(5)
    u = torch.randn(2, 3, 1, generator=g, dtype=torch.float64)
    x0 = torch.randn(2, 3, 4, 2, generator=g, dtype=torch.float64)
    y, x = s4d_step(u[..., 0], a_bar, b_bar, c, x0)
    y_ref, x_ref = s4d_recurrence_ref(u, a_bar, b_bar, c, torch.view_as_complex(x0))
    torch.testing.assert_close(y, y_ref[..., 0])
    torch.testing.assert_close(torch.view_as_complex(x), x_ref)


def test_toeplitz_is_causal_kernel() -> None:
    """Row t of the chunk matrix holds K[t], K[t-1], ..., K[0] and zeros above the diagonal."""
    a_log_re, a_im, log_dt, c_raw = _params(2, 3, seed=11)
    dt_a, _, b_bar = discretize(a_log_re, a_im, log_dt)
    c = torch.view_as_complex(c_raw)
    toeplitz, _, _, _ = chunk_operators(dt_a, b_bar, c, 6)
    kernel = s4d_kernel(dt_a, b_bar, c, 6)
    for t in range(6):
        torch.testing.assert_close(toeplitz[:, t, : t + 1], kernel[:, : t + 1].flip(-1))
        assert torch.all(toeplitz[:, t, t + 1 :] == 0)


def test_bfloat16_products_stay_close() -> None:
    """bf16 operands (as under autocast) keep the output within bf16 rounding of float32."""
    a_log_re, a_im, log_dt, c_raw = (p.detach().float() for p in _params(16, 8, seed=13))
    dt_a, _, b_bar = discretize(a_log_re, a_im, log_dt)
    c = torch.view_as_complex(c_raw.contiguous())
    g = torch.Generator().manual_seed(17)
    u = torch.randn(16, 2, 200, generator=g)
    x0 = torch.randn(2, 16, 8, 2, generator=g)
    y32, x32 = s4d_chunked(u, dt_a, b_bar, c, x0, 32)
    y16, x16 = s4d_chunked(u, dt_a, b_bar, c, x0, 32, matmul_dtype=torch.bfloat16)
    assert y16.dtype == torch.bfloat16 and x16.dtype == torch.float32
    assert ((y16.float() - y32).norm() / y32.norm()).item() < 2e-2
    assert ((x16 - x32).norm() / x32.norm()).item() < 2e-2
