"""The count cache's mix in the model: an empty cache is the model without it, the mix is a
distribution, the state follows the one contract (save/load, reset, expand)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from horizonlm import HorizonConfig, HorizonLM
from horizonlm.layers.count_cache import CountCache
from horizonlm.ops.count_cache import PAD, CountLookup, count_cache_call, empty_tables
from horizonlm.state_io import state_from_tensors, state_to_tensors

from ..conftest import make_horizon

LENGTHS = (2, 3)


def _pair() -> tuple[HorizonLM, HorizonLM]:
    """A model with the count cache and the same weights without it."""
    with_cache = make_horizon(count_lengths=LENGTHS, count_capacity=16)
    without = make_horizon(count_lengths=())
    missing = without.load_state_dict(with_cache.state_dict(), strict=False)
    assert missing.unexpected_keys == ["count_cache.gate.weight", "count_cache.gate.bias"]
    return with_cache, without


def _lookup(model: HorizonLM, tokens: torch.Tensor) -> CountLookup:
    tail = model.count_cache.init_state(tokens.shape[0]).tail  # (B, n)
    look, *_ = count_cache_call(empty_tables(tokens.shape[0]), tail, 0, tokens, LENGTHS, 256, 16)
    return look


def test_where_nothing_was_seen_the_output_is_the_model_without_the_cache() -> None:
    with_cache, without = _pair()
    tokens = torch.randint(0, 4, (2, 50), generator=torch.Generator().manual_seed(0))  # (B, T)
    with torch.no_grad():
        got, state = with_cache(tokens)
        plain, _ = without(tokens)
    look = _lookup(with_cache, tokens)
    unseen = look.chosen < 0  # (B, T)
    assert unseen[:, :2].all() and unseen.sum() >= 2 and (~unseen).sum() > 40
    torch.testing.assert_close(got[unseen], F.log_softmax(plain, -1)[unseen], rtol=0, atol=0)
    assert (got[~unseen] - F.log_softmax(plain, -1)[~unseen]).abs().max() > 1e-3
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(2, 50, dtype=got.dtype))
    assert state.counts.pos == 50 and state.counts.tail.tolist() == tokens[:, -3:].tolist()


def test_an_open_gate_reads_the_counts() -> None:
    """lam -> 1: p_t(v) = c_t(v) / T_t, what followed the context before (here 'ab' -> c twice, d once)."""
    layer = CountCache(d_model=4, vocab=8, lengths=(2,), capacity=100).double()
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.bias.fill_(40.0)
    tokens = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1, 3, 0, 1]])  # a b c a b c a b d a b
    logits = torch.randn(1, 11, 8, dtype=torch.float64)  # (1, T, V)
    out, _ = layer(logits, torch.zeros(1, 11, 4, dtype=torch.float64), tokens)
    probs = out[0, -1].exp()  # (V,)
    torch.testing.assert_close(probs[2], torch.tensor(2 / 3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(probs[3], torch.tensor(1 / 3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_the_mix_and_its_gradients_equal_the_formula_in_float64() -> None:
    """log((1 - lam) softmax(z) + lam c/T) written out directly, values and gradients in z, h and the
    gate, where some tokens have counts, some none, and some counts are zero for most tokens."""
    torch.manual_seed(3)
    layer = CountCache(d_model=6, vocab=5, lengths=(1, 2), capacity=100).double()
    tokens = torch.tensor([[0, 1, 0, 1, 2, 0, 1, 3, 4, 0]])  # (1, T)
    logits = torch.randn(1, 10, 5, dtype=torch.float64, requires_grad=True)  # (1, T, V)
    hidden = torch.randn(1, 10, 6, dtype=torch.float64, requires_grad=True)  # (1, T, D)
    out, _ = layer(logits, hidden, tokens)
    look, *_ = count_cache_call(empty_tables(1), torch.full((1, 2), -1), 0, tokens, (1, 2), 5, 100)
    lam = torch.sigmoid(layer.gate(torch.cat([hidden, layer.features(look).double()], -1)))  # (1, T, 1)
    cache = look.counts.double() / look.counts.sum(-1, keepdim=True).clamp(min=1)  # (1, T, V)
    mixed = torch.where((look.chosen >= 0).unsqueeze(-1), (1 - lam) * logits.softmax(-1) + lam * cache,
                        logits.softmax(-1)).log()  # (1, T, V)
    assert (look.chosen >= 0).sum() >= 5 and (look.chosen < 0).sum() >= 2
    torch.testing.assert_close(out, mixed, rtol=1e-12, atol=1e-12)
    weights = torch.randn(1, 10, 5, dtype=torch.float64)  # (1, T, V)
    got = torch.autograd.grad((out * weights).sum(), (logits, hidden, layer.gate.weight))
    want = torch.autograd.grad((mixed * weights).sum(), (logits, hidden, layer.gate.weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_gradients_are_finite_and_reach_the_gate() -> None:
    model = make_horizon(count_lengths=LENGTHS)
    tokens = torch.randint(0, 4, (2, 41), generator=torch.Generator().manual_seed(1))  # (B, T)
    out, _ = model(tokens[:, :-1])
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert model.count_cache.gate.weight.grad.abs().sum() > 0


def test_saved_state_continues_and_a_reset_stream_forgets() -> None:
    model = make_horizon(count_lengths=LENGTHS, count_capacity=16)
    tokens = torch.randint(0, 4, (2, 60), generator=torch.Generator().manual_seed(2))  # (B, T)
    with torch.no_grad():
        full, _ = model(tokens)
        _, state = model(tokens[:, :24])
        cont, _ = model(tokens[:, 24:], state)
        again, _ = model(tokens[:, 24:], state_from_tensors(*state_to_tensors(state)))
        torch.testing.assert_close(again, cont, rtol=0, atol=0)
        torch.testing.assert_close(cont, full[:, 24:], rtol=1e-10, atol=1e-10)
        reset = state.reset_streams(torch.tensor([False, True]))
        got, _ = model(tokens[:, 24:], reset)
        cold_state = replace(model.init_state(2), pos=24)
        cold_state = replace(cold_state, counts=replace(cold_state.counts, pos=24))
        cold = model.count_cache(torch.zeros(2, 36, 256, dtype=torch.float64), torch.zeros(2, 36, 32, dtype=torch.float64),
                                 tokens[:, 24:], cold_state.counts)[1]
    torch.testing.assert_close(got[0], cont[0], rtol=0, atol=0)
    _, after_reset = model(tokens[:, 24:], reset)
    for name in ("items", "counts"):  # the restarted stream counts only its new tokens
        got_row, cold_row = getattr(after_reset.counts.tables, name)[1], getattr(cold.tables, name)[1]
        assert torch.equal(got_row[after_reset.counts.tables.items[1] != PAD], cold_row[cold.tables.items[1] != PAD])
    assert (got[1] - full[1, 24:]).abs().max() > 1e-3


def test_expand_repeats_the_counts() -> None:
    model = make_horizon(count_lengths=LENGTHS)
    tokens = torch.randint(0, 4, (1, 30), generator=torch.Generator().manual_seed(3))  # (1, T)
    with torch.no_grad():
        _, state = model(tokens)
        one, _ = model(tokens[:, :5], state)
        three, _ = model(tokens[:, :5].expand(3, -1), state.expand(3))
    torch.testing.assert_close(three, one.expand(3, -1, -1), rtol=1e-10, atol=1e-10)


def test_a_state_without_counts_is_refused() -> None:
    model = make_horizon(count_lengths=LENGTHS)
    other = make_horizon()
    with pytest.raises(ValueError, match="count_lengths"):
        model(torch.zeros(1, 3, dtype=torch.long), other.init_state(1))


@pytest.mark.parametrize("lengths", [(3, 2), (2, 2), (0, 4), (65,), (True,), "8"])
def test_bad_count_lengths_are_refused(lengths) -> None:
    with pytest.raises(ValueError, match="count_lengths"):
        HorizonConfig(count_lengths=lengths)


def test_count_lengths_survive_a_json_checkpoint() -> None:
    config = HorizonConfig(count_lengths=(8, 12))
    assert HorizonConfig.from_dict({**config.to_dict(), "count_lengths": [8, 12]}) == config
    with pytest.raises(ValueError, match="vocab_size"):
        HorizonConfig(count_lengths=(8,), vocab_size=(1 << 20) + 1)
