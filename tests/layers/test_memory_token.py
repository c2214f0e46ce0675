"""The token-writing memory (``memory_write="token"``), tested directly: every token writes an
entry tagged with its chunk, a token reads only entries of the last M chunks completed strictly
before it, and the state keeps exactly those plus the pending ones of the incomplete chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from horizonlm.layers.memory import RetrievalMemory
from horizonlm.ops.reference import memory_read_ref

C, D, DK, M, K, TAU = 4, 6, 5, 3, 3, 5.0


def _memory(write: str = "token") -> RetrievalMemory:
    torch.manual_seed(0)
    return RetrievalMemory(D, DK, C, M, K, TAU, query_block=5, eps=1e-5, write=write).double()


def _stream(mem: RetrievalMemory, h: torch.Tensor, sizes: list[int]):
    state, outs, start = None, [], 0
    for size in sizes:
        out, state = mem(h[:, start : start + size], state)
        outs.append(out)
        start += size
    return torch.cat(outs, dim=1), state  # (B, T, D)


def _by_rule(mem: RetrievalMemory, h: torch.Tensor) -> torch.Tensor:
    """The whole stream from scratch: every token's entry, read by brute force under the
    visibility rule (chunks ``t // C - M <= id < t // C``), then the gated add."""
    hn = mem.norm(h)  # (B, T, D)
    keys = F.normalize(mem.key(hn), dim=-1)  # (B, T, Dk)
    values = mem.value(hn)  # (B, T, Dv)
    queries = F.normalize(mem.query(hn), dim=-1)  # (B, T, Dk)
    chunk_of = torch.arange(h.shape[1]) // C  # (T,): each entry's chunk, and each token's completed chunks
    read = memory_read_ref(queries, keys, values, chunk_of, chunk_of, M, K, TAU)  # (B, T, Dv)
    return h + torch.sigmoid(mem.gate(hn)) * mem.out(read)  # (B, T, D)


@pytest.mark.parametrize("sizes", [[50], [3, 9, 1, 22, 15], [4, 8, 12, 26], [1] * 50])
def test_long_stream_equals_reference_and_keeps_the_window(sizes: list[int]) -> None:
    """50 tokens = 12.5 chunks, four times the capacity: FIFO eviction happens several times,
    in calls that start and end inside chunks as well as on their boundaries."""
    mem = _memory()
    length = sum(sizes)
    h = torch.randn(2, length, D, generator=torch.Generator().manual_seed(len(sizes)), dtype=torch.float64)
    with torch.no_grad():
        got, state = _stream(mem, h, sizes)
        want = _by_rule(mem, h)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    first = (length // C - M) * C  # first token of the oldest chunk a later token can see
    assert state.chunk_ids.tolist() == [p // C for p in range(first, length)]  # last M chunks + 2 pending
    keys = F.normalize(mem.key(mem.norm(h[:, first:])), dim=-1)  # (B, T', Dk)
    torch.testing.assert_close(state.keys, keys, rtol=1e-10, atol=1e-12)
    assert state.pos == length and not state.keys.requires_grad


def test_state_before_the_window_fills_keeps_everything() -> None:
    mem = _memory()
    h = torch.randn(1, 2 * C + 1, D, dtype=torch.float64)
    with torch.no_grad():
        _, state = mem(h)
    assert state.chunk_ids.tolist() == [p // C for p in range(2 * C + 1)]


def test_chunk_mode_keeps_one_entry_per_chunk() -> None:
    mem = _memory("chunk")
    h = torch.randn(1, 6 * C + 1, D, dtype=torch.float64)
    with torch.no_grad():
        _, state = _stream(mem, h, [5, 6 * C - 4])
    assert state.chunk_ids.tolist() == [3, 4, 5]


@pytest.mark.parametrize("split", [None, 2 * C + 3])
def test_own_chunk_is_invisible_even_to_an_identical_query(split: int | None) -> None:
    """With W_q = W_k, token ``2C+3+2`` asks exactly the key that token ``2C+1`` wrote (score 1,
    the largest possible), in its own chunk: the read must not take it, whether that entry was
    written in the same call or waits in the state. A token of the next chunk that asks the same
    key does read it (so the check can fail)."""
    mem = _memory()
    with torch.no_grad():
        mem.query.weight.copy_(mem.key.weight)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(1, 4 * C, D, generator=g, dtype=torch.float64)  # (1, T, D)
    writer, asker, later = 2 * C + 1, 2 * C + C - 1, 3 * C + 1
    h[:, asker] = h[:, later] = h[:, writer]
    changed = h.clone()
    changed[:, writer] += torch.randn(D, generator=g, dtype=torch.float64)  # another key and value
    sizes = [4 * C] if split is None else [split, 4 * C - split]
    with torch.no_grad():
        out, _ = _stream(mem, h, sizes)
        out_changed, _ = _stream(mem, changed, sizes)
        if split is not None:
            _, pending = mem(h[:, :split])
            assert pending.chunk_ids.tolist()[-(split % C):] == [2] * (split % C)  # the writer waits there
        hn = mem.norm(h)  # (1, T, D)
        score = F.normalize(mem.query(hn[:, asker]), dim=-1) @ F.normalize(mem.key(hn[:, writer]), dim=-1).T
    assert score.item() == pytest.approx(1.0)
    assert torch.equal(out[:, asker], out_changed[:, asker])
    assert (out[:, later] - out_changed[:, later]).abs().max().item() > 1e-6


def test_gradients_reach_key_and_value_from_entries_of_the_same_call() -> None:
    """Every entry read here was written in this call (the state starts empty): the loss
    reaches W_k and W_v through them."""
    mem = _memory()
    h = torch.randn(2, 5 * C + 2, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out, state = mem(h)
    out.square().sum().backward()
    for weight in (mem.key.weight, mem.value.weight):
        assert weight.grad is not None and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
    assert not state.keys.requires_grad and not state.values.requires_grad  # no gradient across windows
