"""Derived: parameter-only work kept between calls without gradients, and redone when a
parameter changes; the convolution layer's folded kernel through it."""

from __future__ import annotations

import torch

from horizonlm.layers.derived import Derived
from horizonlm.layers.multires_conv import MultiResConv


def test_kept_until_a_parameter_or_the_tag_changes_and_never_with_gradients() -> None:
    p = torch.nn.Parameter(torch.ones(3))  # (3,)
    kept, calls = Derived[torch.Tensor](), []

    def compute() -> torch.Tensor:
        calls.append(1)
        return p * 2  # (3,)

    with torch.no_grad():
        first = kept([p], "a", compute)
        assert kept([p], "a", compute) is first and len(calls) == 1
        kept([p], "b", compute)  # another tag
        assert len(calls) == 2
        p.add_(1.0)  # in place: a new version
        assert torch.equal(kept([p], "b", compute), torch.full((3,), 4.0)) and len(calls) == 3
    kept([p], "b", compute).sum().backward()  # with gradients: computed, differentiable
    assert len(calls) == 4 and torch.equal(p.grad, torch.full((3,), 2.0))


def _steps(conv: MultiResConv, x: torch.Tensor) -> torch.Tensor:
    """x (B, L, D) one token at a time; the outputs (B, L, D)."""
    state, ys = None, []
    for t in range(x.shape[1]):
        y, state = conv(x[:, t : t + 1], state)  # (B, 1, D)
        ys.append(y)
    return torch.cat(ys, dim=1)  # (B, L, D)


def test_the_convolution_keeps_its_folded_kernel_and_sees_a_changed_weight() -> None:
    torch.manual_seed(0)
    conv, fresh = (MultiResConv(d_model=5, kernel_size=3, levels=3).double() for _ in range(2))
    fresh.load_state_dict(conv.state_dict())
    x = torch.randn(2, 7, 5, dtype=torch.float64)  # (B, L, D)
    with torch.no_grad():
        kept = _steps(conv, x)  # (B, L, D)
        assert conv.kept.key is not None
        parallel, _ = conv(x)  # (B, L, D)
    torch.testing.assert_close(kept, parallel, rtol=1e-12, atol=1e-12)
    assert torch.equal(kept, _steps(fresh, x).detach())  # with gradients: recomputed each step
    with torch.no_grad():
        for module in (conv, fresh):
            module.mix_logits.add_(torch.tensor([0.5, -0.5, 1.0], dtype=torch.float64))
            module.weight.mul_(-1.0)
        assert torch.equal(_steps(conv, x), _steps(fresh, x))


def test_a_convolution_step_with_gradients_reaches_weight_and_mix() -> None:
    torch.manual_seed(0)
    conv = MultiResConv(d_model=4, kernel_size=3, levels=2).double()
    _steps(conv, torch.randn(1, 5, 4, dtype=torch.float64)).square().sum().backward()
    assert conv.weight.grad.abs().sum() > 0 and conv.mix_logits.grad.abs().sum() > 0
    assert conv.kept.key is None
