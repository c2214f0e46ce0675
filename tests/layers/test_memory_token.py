"""The token-writing memories (``memory_write="token"`` and ``"pair"``), tested directly: every
token writes an entry tagged with its chunk (in pair mode keyed by the token before it), a token
reads only entries of the last M chunks completed strictly before it, and the state keeps exactly
those plus the pending ones of the incomplete chunk."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from horizonlm.layers.memory import RetrievalMemory
from horizonlm.ops.reference import memory_read_ref

C, D, DK, M, K, TAU = 4, 6, 5, 3, 3, 5.0


def _memory(write: str = "token", span: int = 1, tie: bool = False, capacity: int = M, top_k: int = K) -> RetrievalMemory:
    """A memory in float64; with a key span, its filter drawn at random (it starts as the identity)."""
    torch.manual_seed(0)
    mem = RetrievalMemory(D, DK, C, capacity, top_k, TAU, query_block=5, eps=1e-5, write=write, key_span=span,
                          tie_query=tie).double()
    if mem.span_filter is not None:
        with torch.no_grad():
            mem.span_filter.normal_()
    return mem


def _stream(mem: RetrievalMemory, h: torch.Tensor, sizes: list[int]):
    state, outs, start = None, [], 0
    for size in sizes:
        out, state = mem(h[:, start : start + size], state)
        outs.append(out)
        start += size
    return torch.cat(outs, dim=1), state  # (B, T, D)


def _context(mem: RetrievalMemory, hn: torch.Tensor) -> torch.Tensor:
    """What keys and queries are made from, written out: ``c_t = sum_j w_j * hn_{t-j}`` over the
    key span (zeros before the stream start; tap n-1 of the filter is token t), or hn itself."""
    if mem.span_filter is None:
        return hn
    n = mem.key_span
    rows = []
    for t in range(hn.shape[1]):
        terms = [mem.span_filter[:, n - 1 - j] * hn[:, t - j] for j in range(n) if t - j >= 0]
        rows.append(torch.stack(terms).sum(0))
    return torch.stack(rows, dim=1)  # (B, T, D)


def _entry_keys(mem: RetrievalMemory, hn: torch.Tensor) -> torch.Tensor:
    """Every token's key, written out: from the token itself (token mode) or from the token
    before it, a zero key for the stream's first token (pair mode)."""
    keys = F.normalize(mem.key(_context(mem, hn)), dim=-1)  # (B, T, Dk)
    if mem.write == "pair":
        keys = torch.stack([torch.zeros_like(keys[:, 0])] + [keys[:, t - 1] for t in range(1, keys.shape[1])], 1)
    return keys  # (B, T, Dk)


def _by_rule(mem: RetrievalMemory, h: torch.Tensor) -> torch.Tensor:
    """The whole stream from scratch: every token's entry, read by brute force under the
    visibility rule (chunks ``t // C - M <= id < t // C``), then the gated add."""
    hn = mem.norm(h)  # (B, T, D)
    keys = _entry_keys(mem, hn)  # (B, T, Dk)
    values = mem.value(hn)  # (B, T, Dv)
    queries = F.normalize(mem.query(_context(mem, hn)), dim=-1)  # (B, T, Dk)
    chunk_of = torch.arange(h.shape[1]) // C  # (T,): each entry's chunk, and each token's completed chunks
    read = memory_read_ref(queries, keys, values, chunk_of, chunk_of, M, K, TAU)  # (B, T, Dv)
    return h + torch.sigmoid(mem.gate(hn)) * mem.out(read)  # (B, T, D)


@pytest.mark.parametrize(("write", "span"), [("token", 1), ("pair", 1), ("token", 3), ("pair", 3)])
@pytest.mark.parametrize("sizes", [[50], [3, 9, 1, 22, 15], [4, 8, 12, 26], [1] * 50])
def test_long_stream_equals_reference_and_keeps_the_window(sizes: list[int], write: str, span: int) -> None:
    """50 tokens = 12.5 chunks, four times the capacity: FIFO eviction happens several times,
    in calls that start and end inside chunks as well as on their boundaries (in pair mode the
    key of each call's first entry comes from the call before; with a key span, the inputs the
    filter reaches back to do, even across several one-token calls)."""
    mem = _memory(write, span)
    length = sum(sizes)
    h = torch.randn(2, length, D, generator=torch.Generator().manual_seed(len(sizes)), dtype=torch.float64)
    with torch.no_grad():
        got, state = _stream(mem, h, sizes)
        want = _by_rule(mem, h)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    first = (length // C - M) * C  # first token of the oldest chunk a later token can see
    assert state.chunk_ids.tolist() == [p // C for p in range(first, length)]  # last M chunks + 2 pending
    keys = _entry_keys(mem, mem.norm(h))  # (B, T, Dk)
    torch.testing.assert_close(state.keys, keys[:, first:], rtol=1e-10, atol=1e-12)
    assert state.pos == length and not state.keys.requires_grad
    if write == "pair":
        last = F.normalize(mem.key(_context(mem, mem.norm(h))[:, -1:]), dim=-1)  # (B, 1, Dk)
        torch.testing.assert_close(state.last_key, last, rtol=1e-10, atol=1e-12)
    else:
        assert state.last_key is None
    if span > 1:
        torch.testing.assert_close(state.tail, mem.norm(h)[:, -(span - 1) :], rtol=1e-10, atol=1e-12)
    else:
        assert state.tail is None


def test_pair_entry_holds_what_followed_its_key() -> None:
    """Pair mode, W_q = W_k: a later token equal to token 5 meets the entry of token 6 (keyed
    by token 5, valued by token 6) with score 1, above every other visible entry, while token 5's
    own entry (keyed by token 4) scores less; in token mode the best entry is token 5's own."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(1, 4 * C, D, generator=g, dtype=torch.float64)  # (1, T, D)
    asker = 3 * C + 1
    h[:, asker] = h[:, 5]
    best = {}
    for write in ("pair", "token"):
        mem = _memory(write)
        with torch.no_grad():
            mem.query.weight.copy_(mem.key.weight)
            _, state = mem(h[:, :asker])
            query = F.normalize(mem.query(mem.norm(h[:, asker])), dim=-1)  # (1, Dk)
        scores = (state.keys[0] @ query[0])[state.chunk_ids < asker // C]  # (visible,)
        assert scores.max().item() == pytest.approx(1.0)
        first = asker - state.chunk_ids.numel()  # position of the oldest entry kept (entries end at asker - 1)
        best[write] = first + int(scores.argmax())
    assert best == {"pair": 6, "token": 5}


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


@pytest.mark.parametrize(("write", "span"), [("token", 1), ("pair", 1), ("pair", 3)])
def test_gradients_reach_key_and_value_from_entries_of_the_same_call(write: str, span: int) -> None:
    """Every entry read here was written in this call (the state starts empty): the loss
    reaches W_k and W_v through them, and the key span's filter through keys and queries."""
    mem = _memory(write, span)
    h = torch.randn(2, 5 * C + 2, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out, state = mem(h)
    out.square().sum().backward()
    for weight in (mem.key.weight, mem.value.weight) + (() if span == 1 else (mem.span_filter,)):
        assert weight.grad is not None and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
    assert not state.keys.requires_grad and not state.values.requires_grad  # no gradient across windows


def test_key_span_gradients_match_finite_differences() -> None:
    """The span filter's gradient against central differences, in float64, through a call that
    starts from a carried tail (a tail drawn at random stands in for an earlier call)."""
    mem = _memory("pair", 3)
    h = torch.randn(1, 3 * C + 1, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    state = mem.init_state(1)
    state = replace(state, tail=torch.randn_like(state.tail))
    weight = mem.span_filter

    def loss() -> torch.Tensor:
        out, _ = mem(h, state)
        return out.sin().sum()

    loss().backward()
    for index in [(0, 0), (2, 1), (D - 1, 2)]:
        with torch.no_grad():
            weight[index] += 1e-6
            up = loss().item()
            weight[index] -= 2e-6
            down = loss().item()
            weight[index] += 1e-6
        assert weight.grad[index].item() == pytest.approx((up - down) / 2e-6, rel=1e-5, abs=1e-8)


def test_key_span_starts_as_the_one_token_key() -> None:
    """A fresh filter is the identity: a span-3 memory reads exactly as a span-1 one with the
    same weights, so widening the span changes nothing until training moves the filter."""
    torch.manual_seed(0)
    one = RetrievalMemory(D, DK, C, M, K, TAU, query_block=5, eps=1e-5, write="pair").double()
    torch.manual_seed(0)
    three = RetrievalMemory(D, DK, C, M, K, TAU, query_block=5, eps=1e-5, write="pair", key_span=3).double()
    h = torch.randn(2, 30, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(three(h)[0], one(h)[0], rtol=0, atol=0)


def test_key_span_needs_its_tail() -> None:
    mem = _memory("token", 3)
    state = mem.init_state(1)
    with pytest.raises(ValueError, match="memory_key_span"):
        mem(torch.randn(1, 5, D, dtype=torch.float64), replace(state, tail=None))


@pytest.mark.parametrize("span", [1, 3])
def test_tied_query_is_the_untied_memory_with_w_q_set_to_w_k(span: int) -> None:
    """A tied memory reads, streams and carries exactly as an untied one whose W_q is a copy of
    W_k, and W_k's gradient is the sum of the untied W_k's and W_q's (one matrix, two uses)."""
    tied = _memory("pair", span, tie=True)
    untied = _memory("pair", span)
    assert tied.query is None
    with torch.no_grad():
        untied.load_state_dict(tied.state_dict(), strict=False)
        untied.query.weight.copy_(tied.key.weight)
    h = torch.randn(2, 30, D, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    sizes = [7, 1, 22]
    got, got_state = _stream(tied, h, sizes)
    want, want_state = _stream(untied, h, sizes)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_state.keys, want_state.keys, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_state.last_key, want_state.last_key, rtol=1e-12, atol=1e-12)
    got.sin().sum().backward()
    want.sin().sum().backward()
    torch.testing.assert_close(tied.key.weight.grad, untied.key.weight.grad + untied.query.weight.grad,
                               rtol=1e-10, atol=1e-12)


def test_tied_query_finds_what_followed_a_repeated_context_far_back() -> None:
    """Tied, pair mode, key span 3 (filter drawn at random), top-1 read: a token whose last three
    tokens repeat tokens 10-12 reads exactly the value of token 13, the entry keyed by that
    context, 80 tokens later; changing any token outside 10-13 leaves its output as it was, and
    changing token 13 (the value) does not (so the check can fail)."""
    mem = _memory("pair", 3, tie=True, capacity=50, top_k=1)
    g = torch.Generator().manual_seed(9)
    h = torch.randn(1, 100, D, generator=g, dtype=torch.float64)  # (1, T, D)
    asker = 95
    h[:, asker - 2 : asker + 1] = h[:, 10:13]
    with torch.no_grad():
        base = mem(h)[0][:, asker]  # (1, D)
        for changed_at, same in [(5, True), (30, True), (60, True), (13, False)]:
            other = h.clone()
            other[:, changed_at] += torch.randn(D, generator=g, dtype=torch.float64)
            moved = (mem(other)[0][:, asker] - base).abs().max().item()
            assert (moved == 0.0) if same else (moved > 1e-6), (changed_at, moved)
