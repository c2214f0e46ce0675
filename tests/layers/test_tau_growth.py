"""The read's tau grown with the entries a token sees (``memory_tau_growth``):
``tau_t = tau (1 + a log n_t)``. The fast read equals the brute force in float64 (outputs and
gradients, a included), a = 0 is the fixed tau, and the stream contract holds with it: pieces,
single steps, the graphed decoder and the store-backed memory equal one call."""

from __future__ import annotations

import pytest
import torch

from horizonlm import HorizonConfig
from horizonlm.memory.store import StoreConfig
from horizonlm.ops.memory_read import memory_read
from horizonlm.ops.reference import memory_read_ref
from horizonlm.ops.topk_read import visible_counts, visible_mask

from ..conftest import make_horizon, saved_before_the_field
from ..test_streaming import assert_pieces_steps_and_decode_equal_one_call


def _tokens(length: int, seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))  # (B, T)


def test_visible_counts_are_the_mask_summed() -> None:
    """Ascending ids with filler entries in front (the padded decode frame's -2^40), several windows."""
    ids = torch.tensor([-(2**40)] * 3 + [0, 0, 1, 1, 1, 3, 4, 4, 6])  # (M,)
    seen = torch.tensor([0, 1, 2, 4, 5, 7, 9])  # (L,)
    live_from = torch.tensor([0, 1, 4, 9])  # (B,): streams restarted cold at chunks 1, 4 and after all
    for capacity in (1, 2, 3, 10):
        mask = visible_mask(ids, seen, capacity)  # (L, M)
        assert visible_counts(ids, seen, capacity).tolist() == mask.sum(-1).tolist()
        own = ids.unsqueeze(0) >= live_from.unsqueeze(1)  # (B, M)
        want = (mask.unsqueeze(0) & own.unsqueeze(1)).sum(-1)  # (B, L)
        assert visible_counts(ids, seen, capacity, live_from).tolist() == want.tolist()


@pytest.mark.parametrize("reference_selection", [False, True])
def test_read_equals_the_brute_force(reference_selection: bool) -> None:
    """Outputs and gradients (queries, keys, values, s_0 and a) against ops.reference, float64,
    with entries evicted from the window, tokens that see none, and the first stream restarted
    cold at chunk 2 (its older entries zeroed, as ``reset_streams`` leaves them, and not counted
    in n_t: ``live_from``)."""
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(2, 11, 5, generator=g, dtype=torch.float64), dim=-1)  # (B, L, Dk)
    k = torch.nn.functional.normalize(torch.randn(2, 14, 5, generator=g, dtype=torch.float64), dim=-1)  # (B, M, Dk)
    k[0, :6] = 0.0
    v = torch.randn(2, 14, 3, generator=g, dtype=torch.float64)  # (B, M, Dv)
    v[0, :6] = 0.0
    ids = torch.arange(14) // 3  # (M,)
    seen = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 5])  # (L,)
    live_from = torch.tensor([2, 0])  # (B,)
    null = torch.tensor([0.2], dtype=torch.float64)  # (1,)
    a = torch.tensor([0.4], dtype=torch.float64)  # (1,)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, null, a)]
    got = memory_read(*inputs[:3], ids, seen, 3, 4, 5.0, block=4, null_score=inputs[3], reference=reference_selection,
                      tau_growth=inputs[4], live_from=live_from)  # (B, L, Dv)
    twins = [t.clone().requires_grad_() for t in (q, k, v, null, a)]
    want = memory_read_ref(*twins[:3], ids, seen, 3, 4, 5.0, null_score=twins[3], tau_growth=twins[4],
                           live_from=live_from)  # (B, L, Dv)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    weights = torch.randn(got.shape, generator=g, dtype=torch.float64)  # (B, L, Dv)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    for mine, theirs in zip(inputs, twins):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12)
    assert inputs[4].grad.abs().item() > 0
    fixed = memory_read(q, k, v, ids, seen, 3, 4, 5.0, block=4, null_score=null)  # (B, L, Dv)
    zero = memory_read(q, k, v, ids, seen, 3, 4, 5.0, block=4, null_score=null, tau_growth=torch.zeros(1, dtype=q.dtype))
    torch.testing.assert_close(zero, fixed, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_splits_steps_and_graphed_decode_equal_one_call(seed: int) -> None:
    """With a learned-like a, past FIFO eviction and through the decoder's padded filling memory."""
    model = make_horizon(seed=seed, memory_capacity=4, memory_key_span=3).eval()  # a = 0.3, as if trained
    assert model.memory.tau_growth.item() == pytest.approx(0.3)
    tokens = _tokens(150, seed)
    full = assert_pieces_steps_and_decode_equal_one_call(model, tokens)
    fixed = make_horizon(seed=seed, memory_capacity=4, memory_key_span=3, memory_tau_growth=False).eval()
    assert not torch.equal(full, fixed(tokens)[0])


def test_store_backed_memory_equals_in_state_memory() -> None:
    """The store path counts its visible entries as the in-state path does."""
    model = make_horizon(dtype=torch.float32, memory_capacity=1000, memory_query_block=7).eval()
    tokens = _tokens(100, seed=2, batch=1)
    with torch.no_grad():
        want, _ = model(tokens)
        state = model.init_state(1, store_config=StoreConfig(policy="keep_all"))
        pieces, start = [], 0
        for size in [13, 30] + [1] * 20 + [37]:
            out, state = model(tokens[:, start : start + size], state)
            pieces.append(out)
            start += size
    got = torch.cat(pieces, dim=1)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("overrides", [dict(memory_kind="chunk", memory_key_span=1), dict(use_memory=False),
                                       dict(memory_tau_growth=1)])
def test_it_needs_the_induction_memory(overrides: dict) -> None:
    with pytest.raises(ValueError, match="memory_tau_growth"):
        HorizonConfig(**{"memory_tau_growth": True, **overrides})


def test_it_is_on_wherever_the_induction_memory_is() -> None:
    """None (the default) means on with the induction memory, off without memory or with the chunk
    memory (no second override needed there)."""
    for preset in ("tiny", "cpu", "small", "base"):
        assert HorizonConfig.preset(preset).has_tau_growth
    assert not HorizonConfig(use_memory=False).has_tau_growth
    assert not HorizonConfig(memory_kind="chunk", memory_key_span=1).has_tau_growth
    assert not HorizonConfig(memory_tau_growth=False).has_tau_growth
    assert make_horizon(as_initialised=True).memory.tau_growth.item() == 0.0
    assert make_horizon(use_memory=False).memory is None
    assert make_horizon(memory_kind="chunk", memory_key_span=1).memory.tau_growth is None


def test_a_model_saved_before_the_field_loads_as_it_was(tmp_path) -> None:
    """A checkpoint whose config has no ``memory_tau_growth`` (saved before it existed) had a fixed
    tau: it loads as that model, weights and logits, instead of as today's default."""
    old = make_horizon(memory_tau_growth=False)
    loaded = saved_before_the_field(old, "memory_tau_growth", tmp_path / "old")
    assert loaded.config.memory_tau_growth is False and loaded.memory.tau_growth is None
    tokens = _tokens(40)
    torch.testing.assert_close(loaded(tokens)[0], old(tokens)[0], rtol=0, atol=0)
