"""S4DCore's one-token step: the operators kept between decode steps are the ones the
parameters give, recomputed whenever a parameter changes, and never kept with gradients."""

from __future__ import annotations

import torch

from horizonlm.layers.s4d import S4DCore


def _core() -> S4DCore:
    torch.manual_seed(0)
    return S4DCore(d_model=6, state_size=8, chunk=4, dt_min=1e-3, dt_max=1e-1).double()


def _steps(core: S4DCore, u: torch.Tensor) -> torch.Tensor:
    """Feeds u (D, B, L) one token at a time; returns the outputs (D, B, L)."""
    state, ys = None, []
    for t in range(u.shape[2]):
        y, state = core(u[..., t : t + 1], state)  # (D, B, 1)
        ys.append(y)
    return torch.cat(ys, dim=-1)  # (D, B, L)


def test_kept_operators_equal_recomputed_ones_and_the_parallel_form() -> None:
    core = _core()
    u = torch.randn(6, 2, 9, dtype=torch.float64)  # (D, B, L)
    with torch.no_grad():
        kept = _steps(core, u)  # (D, B, L)
        assert core.kept.key is not None
        parallel, _ = core(u)  # (D, B, L)
    with torch.enable_grad():
        recomputed = _steps(core, u)  # (D, B, L)
    assert torch.equal(kept, recomputed.detach())
    torch.testing.assert_close(kept, parallel, rtol=1e-10, atol=1e-10)


def test_a_changed_parameter_is_seen_by_the_next_step() -> None:
    core, fresh = _core(), _core()
    u = torch.randn(6, 1, 3, dtype=torch.float64)  # (D, B, L)
    with torch.no_grad():
        _steps(core, u)
        for module in (core, fresh):
            module.log_dt.add_(0.5)  # in place, as an optimizer step
            module.c.mul_(-1.0)
        fresh.kept.key = None
        assert torch.equal(_steps(core, u), _steps(fresh, u))
        core.float()  # a new dtype and new storage
        assert _steps(core, u.float()).dtype == torch.float32


def test_a_step_with_gradients_reaches_every_ssm_parameter_and_keeps_nothing() -> None:
    core = _core()
    y = _steps(core, torch.randn(6, 2, 3, dtype=torch.float64))  # (D, B, L)
    y.square().sum().backward()
    for p in (core.a_log_re, core.a_im, core.log_dt, core.c, core.d):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert core.kept.key is None
