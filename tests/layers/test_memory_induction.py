"""The induction memory (``kind="induction"``), tested directly: every token writes an entry
keyed by the context before it and valued by itself, tagged with its chunk; a token reads only
entries of the last M chunks completed strictly before it, through the same W_k, with a null
entry in the softmax; the state keeps exactly those entries plus the pending ones of the
incomplete chunk. The chunk memory (the ablation) keeps one entry per chunk."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from horizonlm.layers.memory import RetrievalMemory
from horizonlm.ops.memory_read import read_weights
from horizonlm.ops.reference import memory_read_ref

C, D, DK, M, K, TAU = 4, 6, 5, 3, 3, 5.0


def _memory(kind: str = "induction", span: int = 1, capacity: int = M, top_k: int = K) -> RetrievalMemory:
    """A memory in float64, its null score moved off its initial value so tests see it act."""
    torch.manual_seed(0)
    mem = RetrievalMemory(D, DK, C, capacity, top_k, TAU, query_block=5, eps=1e-5, kind=kind, key_span=span).double()
    if mem.null_score is not None:
        with torch.no_grad():
            mem.null_score.fill_(0.3)
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
    """Every token's key, written out: from the context before it, a zero key for the stream's
    first token."""
    keys = F.normalize(mem.key(_context(mem, hn)), dim=-1)  # (B, T, Dk)
    return torch.stack([torch.zeros_like(keys[:, 0])] + [keys[:, t - 1] for t in range(1, keys.shape[1])], 1)


def _by_rule(mem: RetrievalMemory, h: torch.Tensor) -> torch.Tensor:
    """The whole stream from scratch: every token's entry, read by brute force under the
    visibility rule (chunks ``t // C - M <= id < t // C``), then the gated add."""
    hn = mem.norm(h)  # (B, T, D)
    keys = _entry_keys(mem, hn)  # (B, T, Dk)
    values = mem.value(hn)  # (B, T, Dv)
    queries = F.normalize(mem.key(_context(mem, hn)), dim=-1)  # (B, T, Dk): W_q = W_k
    chunk_of = torch.arange(h.shape[1]) // C  # (T,): each entry's chunk, and each token's completed chunks
    read = memory_read_ref(queries, keys, values, chunk_of, chunk_of, M, K, TAU, mem.null_score)  # (B, T, Dv)
    return h + torch.sigmoid(mem.gate(hn)) * mem.out(read)  # (B, T, D)


@pytest.mark.parametrize("span", [1, 3])
@pytest.mark.parametrize("sizes", [[50], [3, 9, 1, 22, 15], [4, 8, 12, 26], [1] * 50])
def test_long_stream_equals_reference_and_keeps_the_window(sizes: list[int], span: int) -> None:
    """50 tokens = 12.5 chunks, four times the capacity: FIFO eviction happens several times,
    in calls that start and end inside chunks as well as on their boundaries (the key of each
    call's first entry comes from the call before; with a key span, the inputs the filter
    reaches back to do, even across several one-token calls)."""
    mem = _memory(span=span)
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
    last = F.normalize(mem.key(_context(mem, mem.norm(h))[:, -1:]), dim=-1)  # (B, 1, Dk)
    torch.testing.assert_close(state.last_key, last, rtol=1e-10, atol=1e-12)
    if span > 1:
        torch.testing.assert_close(state.tail, mem.norm(h)[:, -(span - 1) :], rtol=1e-10, atol=1e-12)
    else:
        assert state.tail is None


def test_entry_holds_what_followed_its_key() -> None:
    """W_q = W_k: a later token equal to token 5 meets the entry of token 6 (keyed by token 5,
    valued by token 6) with score 1, above every other visible entry, token 5's own entry
    (keyed by token 4) included."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(1, 4 * C, D, generator=g, dtype=torch.float64)  # (1, T, D)
    asker = 3 * C + 1
    h[:, asker] = h[:, 5]
    mem = _memory()
    with torch.no_grad():
        _, state = mem(h[:, :asker])
        query = F.normalize(mem.key(mem.norm(h[:, asker])), dim=-1)  # (1, Dk)
    scores = (state.keys[0] @ query[0])[state.chunk_ids < asker // C]  # (visible,)
    assert scores.max().item() == pytest.approx(1.0)
    first = asker - state.chunk_ids.numel()  # position of the oldest entry kept (entries end at asker - 1)
    assert first + int(scores.argmax()) == 6


def test_state_before_the_window_fills_keeps_everything() -> None:
    mem = _memory()
    h = torch.randn(1, 2 * C + 1, D, dtype=torch.float64)
    with torch.no_grad():
        _, state = mem(h)
    assert state.chunk_ids.tolist() == [p // C for p in range(2 * C + 1)]


def test_chunk_memory_keeps_one_entry_per_chunk() -> None:
    mem = _memory("chunk")
    h = torch.randn(1, 6 * C + 1, D, dtype=torch.float64)
    with torch.no_grad():
        _, state = _stream(mem, h, [5, 6 * C - 4])
    assert state.chunk_ids.tolist() == [3, 4, 5]


@pytest.mark.parametrize("split", [None, 2 * C + 3])
def test_own_chunk_is_invisible_even_to_an_identical_query(split: int | None) -> None:
    """Token ``3C-1`` repeats token ``2C+1``, so its query is exactly the key of the entry that
    token ``2C+2`` wrote (score 1, the largest possible), in its own chunk: the read must not take
    it, whether that entry was written in the same call or waits in the state. A token of the
    next chunk that asks the same does read it (so the check can fail)."""
    mem = _memory()
    g = torch.Generator().manual_seed(3)
    h = torch.randn(1, 4 * C, D, generator=g, dtype=torch.float64)  # (1, T, D)
    writer, asker, later = 2 * C + 1, 3 * C - 1, 3 * C + 1
    h[:, asker] = h[:, later] = h[:, writer]
    changed = h.clone()
    changed[:, writer + 1] += torch.randn(D, generator=g, dtype=torch.float64)  # the entry's value
    sizes = [4 * C] if split is None else [split, 4 * C - split]
    with torch.no_grad():
        out, _ = _stream(mem, h, sizes)
        out_changed, _ = _stream(mem, changed, sizes)
        if split is not None:
            _, pending = mem(h[:, :split])
            assert pending.chunk_ids.tolist()[-(split % C):] == [2] * (split % C)  # the writer waits there
        hn = mem.norm(h)  # (1, T, D)
        score = F.normalize(mem.key(hn[:, asker]), dim=-1) @ F.normalize(mem.key(hn[:, writer]), dim=-1).T
    assert score.item() == pytest.approx(1.0)
    assert torch.equal(out[:, asker], out_changed[:, asker])
    assert (out[:, later] - out_changed[:, later]).abs().max().item() > 1e-6


@pytest.mark.parametrize(("kind", "span"), [("induction", 1), ("induction", 3), ("chunk", 1)])
def test_gradients_reach_key_and_value_from_entries_of_the_same_call(kind: str, span: int) -> None:
    """Every entry read here was written in this call (the state starts empty): the loss
    reaches W_k and W_v through them, the null score through the softmax, and the key span's
    filter through keys and queries."""
    mem = _memory(kind, span)
    h = torch.randn(2, 5 * C + 2, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out, state = mem(h)
    out.square().sum().backward()
    weights = (mem.key.weight, mem.value.weight) + (() if span == 1 else (mem.span_filter,))
    weights += (mem.null_score,) if kind == "induction" else (mem.query.weight,)
    for weight in weights:
        assert weight.grad is not None and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
    assert not state.keys.requires_grad and not state.values.requires_grad  # no gradient across windows


def test_key_span_gradients_match_finite_differences() -> None:
    """The span filter's gradient against central differences, in float64, through a call that
    starts from a carried tail (a tail drawn at random stands in for an earlier call)."""
    mem = _memory(span=3)
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


def test_key_span_names_its_tokens_from_the_start() -> None:
    """At initialisation a span-3 key already names its three tokens in order: the same three
    tokens score exactly 1, while contexts that share only their last token, or hold the same
    tokens in another order, score clearly less (the filter is drawn at random, not the identity)."""
    mem = _memory(span=3)
    g = torch.Generator().manual_seed(7)
    a, b, c, x = (torch.randn(1, 1, D, generator=g, dtype=torch.float64) for _ in range(4))
    contexts = {"same": [a, b, c], "last_only": [x, x, c], "reordered": [b, a, c]}
    with torch.no_grad():
        def query(tokens: list[torch.Tensor]) -> torch.Tensor:
            hn = mem.norm(torch.cat(tokens, dim=1))  # (1, 3, D)
            return F.normalize(mem.key(_context(mem, hn)[:, -1]), dim=-1)  # (1, Dk)
        reference = query([a, b, c])
        scores = {name: (query(tokens) @ reference.T).item() for name, tokens in contexts.items()}
    assert scores["same"] == pytest.approx(1.0)
    assert scores["last_only"] < 0.95 and scores["reordered"] < 0.95


def test_key_span_needs_its_tail() -> None:
    mem = _memory(span=3)
    state = mem.init_state(1)
    with pytest.raises(ValueError, match="memory_key_span"):
        mem(torch.randn(1, 5, D, dtype=torch.float64), replace(state, tail=None))


def test_null_entry_weights_and_an_empty_read() -> None:
    """The softmax over the K best holds a null entry of value zero: weights are
    ``exp(tau s_j) / (exp(tau s_0) + sum exp(tau s_i))`` (written out here), invisible slots weigh 0,
    and a token with nothing visible reads exactly zero, so the memory adds nothing to it."""
    scores = torch.tensor([[0.9, 0.2, float("-inf")], [float("-inf")] * 3], dtype=torch.float64)  # (2, K)
    null = torch.tensor([0.3], dtype=torch.float64)
    got = read_weights(scores, TAU, null)  # (2, K)
    denom = torch.exp(TAU * null) + torch.exp(TAU * scores[0, :2]).sum()
    torch.testing.assert_close(got[0], torch.cat([torch.exp(TAU * scores[0, :2]) / denom, torch.zeros(1, dtype=torch.float64)]))
    assert torch.equal(got[1], torch.zeros(3, dtype=torch.float64))
    mem = _memory()
    h = torch.randn(2, C, D, generator=torch.Generator().manual_seed(11), dtype=torch.float64)  # the first chunk
    with torch.no_grad():
        out, _ = mem(h)
    assert torch.equal(out, h)  # nothing visible yet: the gated add is of exactly zero


def test_query_finds_what_followed_a_repeated_context_far_back() -> None:
    """Key span 3 (filter drawn at random), top-1 read: a token whose last three
    tokens repeat tokens 10-12 reads exactly the value of token 13, the entry keyed by that
    context, 80 tokens later; changing any token outside 10-13 leaves its output as it was, and
    changing token 13 (the value) does not (so the check can fail)."""
    mem = _memory(span=3, capacity=50, top_k=1)
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
