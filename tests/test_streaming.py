"""The golden property: any split of a stream, fed with the carried state, equals one call."""

from __future__ import annotations

import pytest
import torch

from horizonlm import HorizonConfig, HorizonLM

from .conftest import make_horizon, make_transformer

LENGTH = 61  # ~7.6 chunks of C=8, memory capacity 6 so FIFO eviction happens


def _random_splits(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(set(torch.randint(1, length, (4,), generator=g).tolist()))
    return [b - a for a, b in zip([0] + cuts, cuts + [length])]


def _stream(model, tokens, sizes):
    state, outs, start = None, [], 0
    for size in sizes:
        logits, state = model(tokens[:, start : start + size], state)
        outs.append(logits)
        start += size
    return torch.cat(outs, dim=1), state


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 1e-5, f"relative difference {rel}"
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("seed,ssm_kind", [(0, "s4d"), (1, "s4d"), (2, "s4d"), (0, "selective"), (1, "selective")])
def test_horizon_random_splits_equal_one_call(seed: int, ssm_kind: str) -> None:
    model = make_horizon(dtype=torch.float32, seed=seed, ssm_kind=ssm_kind)
    tokens = torch.randint(0, 256, (2, LENGTH), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full, full_state = model(tokens)
        pieces, piece_state = _stream(model, tokens, _random_splits(LENGTH, seed))
    _assert_same(pieces, full)
    assert piece_state.pos == full_state.pos == LENGTH
    torch.testing.assert_close(piece_state.memory.keys, full_state.memory.keys, rtol=1e-4, atol=1e-5)
    assert full_state.memory.keys.shape[1] == model.config.memory_capacity  # evicted down to M


@pytest.mark.parametrize("ssm_kind", ["s4d", "selective"])
def test_horizon_one_token_at_a_time_equals_one_call(ssm_kind: str) -> None:
    model = make_horizon(dtype=torch.float32, ssm_kind=ssm_kind)
    tokens = torch.randint(0, 256, (2, LENGTH), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        full, _ = model(tokens)
        steps, _ = _stream(model, tokens, [1] * LENGTH)
    _assert_same(steps, full)


PASSKEY_MEMORY = dict(memory_tie_query=True, memory_before_supervisor=True, global_layer=0)
"""The memory of configs/passkey_pair.yaml (with pair writes and a key span)."""


@pytest.mark.parametrize(("write", "span", "extra"), [("token", 1, {}), ("pair", 1, {}), ("pair", 4, {}),
                                                      ("pair", 4, PASSKEY_MEMORY)])
@pytest.mark.parametrize("seed", [0, 1])
def test_token_memory_splits_and_steps_equal_one_call(seed: int, write: str, span: int, extra: dict) -> None:
    """memory_write=token (and pair, with a key span too, and the passkey recipe's tied query,
    placement and order) over 150 tokens (~19 chunks, several times the 4-chunk window, so FIFO
    eviction happens again and again), split at random places (mostly inside chunks) and stepped
    one token at a time; the memory left is one call's, entry for entry."""
    length, capacity = 150, 4
    model = make_horizon(dtype=torch.float32, seed=seed, memory_write=write, memory_capacity=capacity,
                         memory_key_span=span, **extra)
    if span > 1:
        with torch.no_grad():
            model.memory.span_filter.normal_()  # not the identity it starts as
    tokens = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full, full_state = model(tokens)
        pieces, piece_state = _stream(model, tokens, _random_splits(length, seed))
        steps, step_state = _stream(model, tokens, [1] * length)
    _assert_same(pieces, full)
    _assert_same(steps, full)
    chunk = model.config.chunk_size
    want_ids = [p // chunk for p in range((length // chunk - capacity) * chunk, length)]
    for state in (full_state, piece_state, step_state):
        assert state.memory.chunk_ids.tolist() == want_ids  # the last M chunks and the pending tokens
        torch.testing.assert_close(state.memory.keys, full_state.memory.keys, rtol=1e-4, atol=1e-5)
        if write == "pair":
            torch.testing.assert_close(state.memory.last_key, full_state.memory.last_key, rtol=1e-4, atol=1e-5)
        if span > 1:
            torch.testing.assert_close(state.memory.tail, full_state.memory.tail, rtol=1e-4, atol=1e-5)


def test_memory_before_supervisor_keys_on_the_token_stream_alone() -> None:
    """Memory first, before block 0: its entries are the same whatever the supervisor holds
    (here its weights redrawn); after the supervisor (the default order) they are not."""
    tokens = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    for first in (True, False):
        model = make_horizon(memory_write="pair", memory_before_supervisor=first, global_layer=0)
        with torch.no_grad():
            keys = model(tokens)[1].memory.keys  # (1, M, Dk)
            for weight in model.supervisor.parameters():
                weight.normal_()
            moved = (model(tokens)[1].memory.keys - keys).abs().max().item()
        assert (moved == 0.0) if first else (moved > 1e-6), (first, moved)


def test_pair_memory_state_saved_and_loaded_continues_the_stream() -> None:
    """The pair memory's last key and the key span's tail travel through ``state_to_tensors``:
    a stream resumed from the saved state equals one never interrupted."""
    from horizonlm.state_io import state_from_tensors, state_to_tensors

    model = make_horizon(dtype=torch.float32, memory_write="pair", memory_capacity=4, memory_key_span=3)
    with torch.no_grad():
        model.memory.span_filter.normal_()
    tokens = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(tokens)
        first, state = model(tokens[:, :27])
        tensors, header = state_to_tensors(state)
        assert "state.memory.last_key" in tensors and "state.memory.tail" in tensors
        rest, _ = model(tokens[:, 27:], state_from_tensors(tensors, header))
    _assert_same(torch.cat([first, rest], dim=1), full)


@pytest.mark.parametrize("ssm_kind", ["s4d", "selective"])
def test_horizon_long_ssm_windows_equal_one_call(ssm_kind: str) -> None:
    """Calls of several SSM chunks and a partial one against token-by-token stepping."""
    torch.manual_seed(0)
    model = HorizonLM(HorizonConfig.preset("tiny", ssm_chunk=8, ssm_kind=ssm_kind))
    tokens = torch.randint(0, 256, (1, 37))
    with torch.no_grad():
        full, _ = model(tokens)
        steps, _ = _stream(model, tokens, [1] * 37)
    _assert_same(steps, full)


def test_state_is_not_mutated() -> None:
    model = make_horizon(dtype=torch.float32)
    tokens = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        _, state = model(tokens[:, :10])
        first, _ = model(tokens[:, 10:], state)
        second, _ = model(tokens[:, 10:], state)
    assert torch.equal(first, second)


@pytest.mark.parametrize("seed", [0, 1])
def test_transformer_kv_cache_equals_one_call(seed: int) -> None:
    model = make_transformer(dtype=torch.float32, seed=seed)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full, _ = model(tokens)
        pieces, _ = _stream(model, tokens, _random_splits(40, seed))
        steps, state = _stream(model, tokens, [1] * 40)
    _assert_same(pieces, full)
    _assert_same(steps, full)
    assert state.keys[0].shape[2] == 40
