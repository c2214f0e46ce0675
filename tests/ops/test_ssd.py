"""The chunked SSD scan against the explicit recurrence in float64."""

from __future__ import annotations

import pytest
import torch

from horizonlm.ops.reference import ssd_recurrence_ref
from horizonlm.ops.ssd import ssd_chunked, ssd_step

CHUNK = 8


def _inputs(length: int, seed: int, batch: int = 2, heads: int = 3, head_dim: int = 4, state: int = 5):
    """x, dt, a, b, c, s0 in float64, all requiring grad; dt in (0.01, 1), A in (-4, -0.5)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    dt = torch.rand(batch, length, heads, generator=g, dtype=torch.float64) * 0.99 + 0.01
    a = -(torch.rand(heads, generator=g, dtype=torch.float64) * 3.5 + 0.5)
    tensors = (rand(batch, length, heads, head_dim), dt, a, rand(batch, length, state), rand(batch, length, state),
               rand(batch, heads, head_dim, state))
    return tuple(t.requires_grad_() for t in tensors)


@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_chunked_matches_recurrence(length: int) -> None:
    """Outputs, final states and gradients w.r.t. x, dt, A, B, C and the incoming state."""
    inputs = _inputs(length, seed=length)
    y_fast, s_fast = ssd_chunked(*inputs, CHUNK)
    y_ref, s_ref = ssd_recurrence_ref(*inputs)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(s_fast, s_ref, rtol=1e-10, atol=1e-11)

    g = torch.Generator().manual_seed(99)
    g_y = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    g_s = torch.randn(s_ref.shape, generator=g, dtype=torch.float64)

    def grads(y, s):
        return torch.autograd.grad((y * g_y).sum() + (s * g_s).sum(), inputs)

    for name, gf, gr in zip(("x", "dt", "A", "B", "C", "s0"), grads(y_fast, s_fast), grads(y_ref, s_ref)):
        torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")


def test_step_is_one_token_of_the_recurrence() -> None:
    x, dt, a, b, c, s0 = _inputs(1, seed=3)
    y_ref, s_ref = ssd_recurrence_ref(x, dt, a, b, c, s0)
    y, s = ssd_step(x[:, 0], dt[:, 0], a, b[:, 0], c[:, 0], s0)
    torch.testing.assert_close(y, y_ref[:, 0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-13)


def test_result_does_not_depend_on_chunk_length() -> None:
    inputs = _inputs(45, seed=11)
    y8, s8 = ssd_chunked(*inputs, 8)
    y16, s16 = ssd_chunked(*inputs, 16)
    torch.testing.assert_close(y8, y16, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(s8, s16, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_decays_stay_finite(dtype: torch.dtype) -> None:
    """dt*A = -50 every step for 200 tokens: cumulative log decays reach -10^4 inside the scan,
    whose upper-triangle differences would overflow exp if they were not masked first."""
    x, _, _, b, c, s0 = (t.detach().to(dtype) for t in _inputs(200, seed=5))
    dt = torch.full(x.shape[:3], 50.0, dtype=dtype, requires_grad=True)
    a = torch.full((x.shape[2],), -1.0, dtype=dtype, requires_grad=True)
    x.requires_grad_()
    y, s = ssd_chunked(x, dt, a, b, c, s0, 64)
    y_ref, s_ref = ssd_recurrence_ref(x, dt, a, b, c, s0)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(s, s_ref, rtol=tol, atol=tol)
    for grad in torch.autograd.grad(y.sum() + s.sum(), (x, dt, a)):
        assert torch.isfinite(grad).all()


def test_bf16_inputs_keep_a_float32_state() -> None:
    """bf16 x, B, C: output in bf16 near the float64 result, state in float32."""
    x, dt, a, b, c, s0 = (t.detach() for t in _inputs(3 * CHUNK + 5, seed=8))
    y_ref, s_ref = ssd_recurrence_ref(x, dt, a, b, c, s0)
    y, s = ssd_chunked(x.bfloat16(), dt.float(), a.float(), b.bfloat16(), c.bfloat16(), s0.float(), CHUNK)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    scale_y, scale_s = y_ref.abs().max(), s_ref.abs().max()
    assert (y.double() - y_ref).abs().max() < 3e-2 * scale_y
    assert (s.double() - s_ref).abs().max() < 3e-2 * scale_s
