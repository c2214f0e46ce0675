"""The late read (``memory_late_read``): what the induction memory added, added again before the
final norm. On by default wherever the induction memory is; it starts at zero, learns, leaves the
stream contract intact and follows the memory when the read is dropped; a model saved before it
existed loads without it."""

from __future__ import annotations

import pytest
import torch

from horizonlm import HorizonConfig
from horizonlm.layers.memory import reads_dropped

from ..conftest import make_horizon, saved_before_the_field
from ..test_streaming import assert_pieces_steps_and_decode_equal_one_call


def _tokens(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(seed))  # (B, T)


def test_it_starts_as_the_model_without_it_and_learns() -> None:
    """W_o' starts at zero: the logits are exactly those of the same weights without the late read,
    and W_o' is what gets a gradient first."""
    with_late = make_horizon(memory_late_read=True, as_initialised=True)
    without = make_horizon(memory_late_read=False)
    without.load_state_dict({k: v for k, v in with_late.state_dict().items() if not k.startswith("late_read.")})
    tokens = _tokens(60)
    got, _ = with_late(tokens)
    want, _ = without(tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.square().mean().backward()
    assert with_late.late_read.out.weight.grad.abs().sum() > 0


def test_a_dropped_read_adds_nothing_late_either() -> None:
    """With the memory's read left out (training's read dropout, passkey's causal check), the late
    path adds nothing: the model equals itself with the late read's projection zeroed."""
    model = make_horizon(memory_late_read=True)
    tokens = _tokens(60, seed=1)
    with torch.no_grad(), reads_dropped(model.memory):
        dropped, _ = model(tokens)
        model.late_read.out.weight.zero_()
        dropped_no_late, _ = model(tokens)
    torch.testing.assert_close(dropped, dropped_no_late, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_splits_steps_and_graphed_decode_equal_one_call(seed: int) -> None:
    """Pieces, single steps and the graphed decoder give the one call's logits, with a trained-like
    (non-zero) late projection, past FIFO eviction."""
    model = make_horizon(seed=seed, memory_late_read=True, memory_capacity=4, memory_key_span=3).eval()
    assert_pieces_steps_and_decode_equal_one_call(model, _tokens(150, seed))


@pytest.mark.parametrize("overrides", [dict(memory_kind="chunk"), dict(use_memory=False), dict(memory_late_read=1)])
def test_it_needs_the_induction_memory(overrides: dict) -> None:
    with pytest.raises(ValueError, match="memory_late_read"):
        HorizonConfig(**{"memory_late_read": True, **overrides})


def test_it_is_on_wherever_the_induction_memory_is() -> None:
    """None (the default) means on with the induction memory, off without memory or with the chunk
    memory, so those switches need no second override (a dict of a config merged with them too)."""
    for preset in ("tiny", "cpu", "small", "base"):
        assert HorizonConfig.preset(preset).has_late_read
    assert not HorizonConfig(use_memory=False).has_late_read
    assert not HorizonConfig(memory_kind="chunk", memory_key_span=1).has_late_read
    assert not HorizonConfig(memory_late_read=False).has_late_read
    assert not HorizonConfig(**{**HorizonConfig.preset("tiny").to_dict(), "use_memory": False}).has_late_read
    assert make_horizon().late_read is not None and make_horizon(use_memory=False).late_read is None


def test_a_model_saved_before_the_field_loads_as_it_was(tmp_path) -> None:
    """A checkpoint whose config has no ``memory_late_read`` (saved before it existed) had no late
    read: it loads as that model, weights and logits, instead of as today's default."""
    old = make_horizon(memory_late_read=False)
    loaded = saved_before_the_field(old, "memory_late_read", tmp_path / "old")
    assert loaded.config.memory_late_read is False and loaded.late_read is None
    tokens = _tokens(40)
    torch.testing.assert_close(loaded(tokens)[0], old(tokens)[0], rtol=0, atol=0)
    assert HorizonConfig.from_dict({k: v for k, v in HorizonConfig().to_dict().items()
                                    if k != "memory_late_read"}).memory_late_read is False
