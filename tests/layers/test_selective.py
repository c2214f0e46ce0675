"""SelectiveSSM under the state contract: streaming, stepping, causality, gradients, bf16."""

from __future__ import annotations

import pytest
import torch

from horizonlm.layers.param_tags import SSM_PARAM_TAG
from horizonlm.layers.selective import SelectiveSSM

D_MODEL, STATE, HEAD_DIM, CHUNK = 16, 6, 4, 8
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-11)}


def _layer(dtype: torch.dtype = torch.float64, recompute: bool = False, seed: int = 0) -> SelectiveSSM:
    torch.manual_seed(seed)
    layer = SelectiveSSM(D_MODEL, STATE, HEAD_DIM, CHUNK, dt_min=1e-2, dt_max=0.5, recompute=recompute)
    return layer.to(dtype)


def _input(length: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, length, D_MODEL, generator=g, dtype=torch.float64).to(dtype)


def _stream(layer: SelectiveSSM, x: torch.Tensor, cuts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    state, ys = None, []
    for start, stop in zip([0, *cuts], [*cuts, x.shape[1]]):
        y, state = layer(x[:, start:stop], state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cuts", [[5], [8], [3, 4, 13, 29], [1, 2, 17]])
def test_streaming_equals_one_call(dtype: torch.dtype, cuts: list[int]) -> None:
    """Pieces split anywhere (inside chunks, single tokens) and fed with the returned state."""
    layer, x = _layer(dtype), _input(37, dtype)
    with torch.no_grad():
        y_full, s_full = layer(x)
        y_parts, s_parts = _stream(layer, x, cuts)
    torch.testing.assert_close(y_parts, y_full, **TOL[dtype])
    torch.testing.assert_close(s_parts, s_full, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stepping_equals_one_call(dtype: torch.dtype) -> None:
    layer, x = _layer(dtype), _input(19, dtype)
    with torch.no_grad():
        y_full, s_full = layer(x)
        y_steps, s_steps = _stream(layer, x, list(range(1, 19)))
    torch.testing.assert_close(y_steps, y_full, **TOL[dtype])
    torch.testing.assert_close(s_steps, s_full, **TOL[dtype])


def test_causality() -> None:
    layer, x = _layer(), _input(29)
    with torch.no_grad():
        y, _ = layer(x)
        for j in (0, 7, 8, 20, 28):
            changed = x.clone()
            changed[:, j] += 1.0
            y_changed, _ = layer(changed)
            torch.testing.assert_close(y_changed[:, :j], y[:, :j], rtol=0, atol=0)
            assert not torch.allclose(y_changed[:, j], y[:, j])


def test_state_is_returned_not_mutated() -> None:
    layer, x = _layer(), _input(13)
    state = torch.randn(2, *layer.state_shape, dtype=torch.float64)
    kept = state.clone()
    for piece in (x, x[:, :1]):
        _, new_state = layer(piece, state)
        assert torch.equal(state, kept) and new_state is not state


def test_init_state_shape_and_dtype() -> None:
    heads = D_MODEL // HEAD_DIM
    assert _layer(torch.float32).init_state(3).shape == (3, heads, HEAD_DIM, STATE)
    assert _layer(torch.float32).init_state(3).dtype == torch.float32
    assert _layer(torch.float64).init_state(3).dtype == torch.float64


@pytest.mark.parametrize("recompute", [False, True])
def test_gradients_reach_every_parameter(recompute: bool) -> None:
    layer = _layer(recompute=recompute)
    y, state = layer(_input(21), torch.randn(2, *layer.state_shape, dtype=torch.float64))
    (y.square().sum() + state.square().sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_recompute_gives_the_same_gradients() -> None:
    grads = []
    for recompute in (False, True):
        layer = _layer(recompute=recompute)
        y, _ = layer(_input(21))
        y.square().sum().backward()
        grads.append([p.grad for p in layer.parameters()])
    for g_plain, g_recomputed in zip(*grads):
        torch.testing.assert_close(g_recomputed, g_plain, rtol=1e-12, atol=1e-12)


def test_dynamics_parameters_are_tagged_and_initialised() -> None:
    layer = SelectiveSSM(64, STATE, HEAD_DIM, CHUNK, dt_min=1e-3, dt_max=1e-1)
    assert {n for n, p in layer.named_parameters() if getattr(p, SSM_PARAM_TAG, False)} == {"A_log", "dt_bias", "D"}
    a = -torch.exp(layer.A_log)
    dt = torch.nn.functional.softplus(layer.dt_bias)
    assert ((a <= -1) & (a >= -16)).all()
    assert ((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 1e-1 * (1 + 1e-5))).all()
    assert torch.equal(layer.D, torch.ones_like(layer.D))


def test_bf16_autocast_stays_near_float32() -> None:
    """CPU bf16 autocast: the state stays float32 and the output is within 3e-2 of the
    float32 output's scale (bf16 keeps 8 bits of mantissa, about 4e-3 per rounding)."""
    layer, x = _layer(torch.float32), _input(45, torch.float32)
    with torch.no_grad():
        y_ref, s_ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, s = layer(x)
            y_step, s_step = layer(x[:, :1])
    assert s.dtype == torch.float32 and s_step.dtype == torch.float32
    assert (y.float() - y_ref).abs().max() < 3e-2 * y_ref.abs().max()
    assert (s - s_ref).abs().max() < 3e-2 * s_ref.abs().max()
    assert (y_step.float() - y_ref[:, :1]).abs().max() < 3e-2 * y_ref.abs().max()
