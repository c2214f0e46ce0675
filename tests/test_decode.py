"""The graph decoders' bookkeeping equals calling the model token by token.

On the CPU a decoder runs the same bookkeeping as on the GPU: the same static buffers, written
in place, and every replay of a chunk runs at the stream position frozen at capture, exactly as a
CUDA graph does; only the graph itself is replaced by calling the step. The graph against eager
decoding on the GPU is checked by ``horizon bench speed`` (its ``checks`` part).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from horizonlm.decode import GraphedDecoder, GraphedTransformerDecoder, bf16_linears, state_tensors
from horizonlm.ops.count_cache import PAD
from horizonlm.state import CountCacheState

from .conftest import make_horizon, make_transformer


def _tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))  # (B, T)


def _decode_alongside(model, tokens: torch.Tensor, start: int, on_step=None, **decoder_options):
    """Decode ``tokens[:, start:]`` with a GraphedDecoder and with the model token by token from the
    same state, asserting equal logits at every step (``on_step(t, decoder, model_state)`` after
    each). Returns the decoder, the model's state and the last step's logits. Chunk ends run
    eagerly and a filling memory captures a replay per chunk unless ``graph_chunk_ends`` and
    ``fill_frame_entries`` are passed (the counts of ``_assert_replays``)."""
    decoder_options.setdefault("graph_chunk_ends", False)
    decoder_options.setdefault("fill_frame_entries", 0)
    with torch.no_grad():
        state = model.init_state(tokens.shape[0]) if start == 0 else model(tokens[:, :start])[1]
        decoder = GraphedDecoder(model, state, **decoder_options)
        want_state = state
        for t in range(start, tokens.shape[1]):
            got = decoder.step(tokens[:, t : t + 1])  # (B, V)
            want, want_state = model(tokens[:, t : t + 1], want_state)  # (B, 1, V)
            torch.testing.assert_close(got, want[:, -1], rtol=1e-9, atol=1e-10)
            if on_step is not None:
                on_step(t, decoder, want_state)
    return decoder, want_state, got


def _linear_tensors(net: torch.nn.Module) -> set[int]:
    """The data pointers of every Linear's weight and bias in ``net``."""
    return {p.data_ptr() for m in net.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}


@contextmanager
def _casts():
    """The data pointers of the tensors cast (``aten._to_copy``) inside the block."""
    sources: list[int] = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket) == "aten._to_copy":
                sources.append(args[0].data_ptr())
            return func(*args, **(kwargs or {}))

    with Casts():
        yield sources


def _assert_same_state(got, want) -> None:
    for got_t, want_t in zip(state_tensors(got), state_tensors(want), strict=True):
        torch.testing.assert_close(got_t, want_t, rtol=1e-9, atol=1e-10)


def _assert_replays(decoder: GraphedDecoder, start: int, end: int, chunk: int, capacity: int,
                    at_chunk_start: bool) -> None:
    """Chunk-end steps ran eagerly; the others replayed: one capture per chunk while the memory
    fills, then none: a replay captured once the memory is full (for the induction memory, at a
    chunk's first step, ``at_chunk_start``) serves every later chunk."""
    replayed = [p for p in range(start, end) if (p + 1) % chunk]
    assert decoder.eager_steps == end - start - len(replayed)
    captures, kept = 0, False
    for k in sorted({p // chunk for p in replayed}):
        if kept:  # k >= capacity: the memory keeps its size from here on
            continue
        captures += 1
        first = min(p for p in replayed if p // chunk == k)
        kept = k >= capacity and (first % chunk == 0 or not at_chunk_start)
    assert decoder.captures == captures
    assert captures < len({p // chunk for p in replayed})  # some chunk reused a replay


@pytest.mark.parametrize("start", [0, 5, 7])
def test_decoder_matches_model_steps(start: int) -> None:
    """From a chunk's first token, mid-chunk and a chunk's last token, past FIFO eviction (the chunk
    memory, whose entries change only at chunk ends, so the steps between replay a graph)."""
    model = make_horizon(memory_kind="chunk").eval()
    chunk, capacity = model.config.chunk_size, model.config.memory_capacity
    end = (capacity + 1) * chunk + 3  # more completed chunks than the memory holds
    decoder, want_state, _ = _decode_alongside(model, _tokens(2, end), start)
    snap = decoder.snapshot()
    assert snap.pos == snap.supervisor.pos == snap.memory.pos == want_state.pos == end
    assert snap.memory.chunk_ids.tolist() == list(range(end // chunk - capacity, end // chunk))
    _assert_same_state(snap, want_state)
    _assert_replays(decoder, start, end, chunk, capacity, at_chunk_start=False)


@pytest.mark.parametrize(("start", "span"), [(0, 3), (5, 3), (7, 1), (13, 3)])
def test_decoder_with_induction_memory_replays_and_matches_model_steps(start: int, span: int) -> None:
    """The induction memory writes an entry every step, into a padded slot the chunk's own tokens
    cannot see, so the steps between chunk ends replay too (one capture per chunk until the memory
    is full, then one for every chunk); the logits and the state are the model's, step by step,
    past FIFO eviction, from any start in a chunk."""
    model = make_horizon(memory_capacity=4, memory_key_span=span).eval()
    chunk = model.config.chunk_size
    end = 6 * chunk + 3
    tokens = _tokens(2, end, seed=3)

    def snapshot_matches(t: int, decoder: GraphedDecoder, want_state) -> None:
        if t % 5 == 0:  # mid-chunk snapshots are the model's state too, padding removed
            snap = decoder.snapshot()
            assert snap.memory.chunk_ids.tolist() == want_state.memory.chunk_ids.tolist()
            _assert_same_state(snap, want_state)

    decoder, _, got = _decode_alongside(model, tokens, start, snapshot_matches)
    with torch.no_grad():
        full = model(tokens)[0]
    torch.testing.assert_close(got, full[:, -1], rtol=1e-9, atol=1e-10)
    _assert_replays(decoder, start, end, chunk, model.config.memory_capacity, at_chunk_start=True)


@pytest.mark.parametrize(("kind", "start"), [("induction", 0), ("induction", 13), ("chunk", 5)])
def test_graphed_chunk_ends_match_model_steps(kind: str, start: int) -> None:
    """graph_chunk_ends: once one replay serves every chunk, the chunk-end step replays too (one
    capture), its eviction and the frame's shift inside it; logits and states (snapshots at chunk
    ends and inside chunks) are the model's step by step, and no chunk end after that runs eagerly."""
    model = make_horizon(memory_kind=kind, memory_capacity=4, memory_key_span=3 if kind == "induction" else 1).eval()
    chunk, capacity = model.config.chunk_size, model.config.memory_capacity
    end = (capacity + 4) * chunk + 3
    tokens = _tokens(2, end, seed=5)

    def snapshot_matches(t: int, decoder: GraphedDecoder, want_state) -> None:
        if (t + 1) % chunk in (0, 2):
            snap = decoder.snapshot()
            assert snap.pos == want_state.pos
            assert snap.memory.chunk_ids.tolist() == want_state.memory.chunk_ids.tolist()
            _assert_same_state(snap, want_state)

    decoder, _, _ = _decode_alongside(model, tokens, start, snapshot_matches, graph_chunk_ends=True)
    ends = [p for p in range(start, end) if (p + 1) % chunk == 0]
    assert decoder.end_captures == 1
    # eager only until the first chunk end after a replay captured at a chunk start with the memory full
    first_full = max(capacity, -(-start // chunk) if kind == "induction" else start // chunk)
    assert decoder.eager_steps == sum(1 for p in ends if p // chunk < first_full)
    assert decoder.eager_steps < len(ends)


@pytest.mark.parametrize(("kind", "start"), [("induction", 0), ("induction", 13), ("chunk", 0), ("chunk", 5)])
@pytest.mark.parametrize("graph_chunk_ends", [False, True])
def test_a_filling_memory_padded_to_full_replays_one_graph(kind: str, start: int, graph_chunk_ends: bool) -> None:
    """With fill_frame_entries (the decoder's default), a memory not yet full is padded with
    filler entries no token sees, in a frame moved on to a full memory: one replay serves every
    chunk from the first capture at a chunk start (the chunk memory: from any start), through
    the filling and past FIFO eviction; logits and states (fillers removed, chunk ids the
    stream's) are the model's step by step."""
    model = make_horizon(memory_kind=kind, memory_capacity=4, memory_key_span=3 if kind == "induction" else 1).eval()
    chunk, capacity = model.config.chunk_size, model.config.memory_capacity
    end = (capacity + 3) * chunk + 3
    tokens = _tokens(2, end, seed=11)

    def snapshot_matches(t: int, decoder: GraphedDecoder, want_state) -> None:
        if (t + 1) % chunk in (0, 1, 3):
            snap = decoder.snapshot()
            assert snap.pos == want_state.pos
            assert snap.memory.chunk_ids.tolist() == want_state.memory.chunk_ids.tolist()
            _assert_same_state(snap, want_state)

    decoder, _, _ = _decode_alongside(model, tokens, start, snapshot_matches, graph_chunk_ends=graph_chunk_ends,
                                      fill_frame_entries=capacity * chunk)
    mid_chunk = kind == "induction" and start % chunk != 0  # not full until a capture at a chunk start
    assert decoder.captures == 1 + int(mid_chunk)
    ends = sum(1 for p in range(start, end) if (p + 1) % chunk == 0)
    assert decoder.eager_steps == (int(mid_chunk) if graph_chunk_ends else ends)
    assert decoder.end_captures == int(graph_chunk_ends)
    assert decoder.fillers == 0


def test_a_memory_beyond_fill_frame_entries_is_not_padded() -> None:
    """A memory larger than fill_frame_entries is not preallocated: a replay per chunk while it
    fills, as without the option."""
    model = make_horizon(memory_capacity=4).eval()
    chunk = model.config.chunk_size
    decoder, _, _ = _decode_alongside(model, _tokens(1, 3 * chunk, seed=2), 0, fill_frame_entries=4 * chunk - 1)
    assert decoder.captures == 3 and decoder.fillers == 0
    with pytest.raises(ValueError, match="fill_frame_entries"):
        GraphedDecoder(model, model.init_state(1), fill_frame_entries=-1)


@pytest.mark.parametrize("overrides", [{"use_memory": False}, {"use_supervisor": False}])
@pytest.mark.parametrize("graph_chunk_ends", [False, True])
def test_decoder_without_memory_or_supervisor_matches_model_steps(overrides: dict, graph_chunk_ends: bool) -> None:
    """Without a memory one replay serves every chunk from the start (nothing changes shape), and
    with graphed chunk ends no step runs eagerly; without the supervisor the chunk ends still
    replay once the memory is full. Logits are the model's step by step either way."""
    model = make_horizon(**overrides).eval()
    chunk = model.config.chunk_size
    decoder, want_state, _ = _decode_alongside(model, _tokens(2, 12 * chunk + 3, seed=7), 3,
                                               graph_chunk_ends=graph_chunk_ends)
    _assert_same_state(decoder.snapshot(), want_state)
    if "use_memory" in overrides:
        assert decoder.captures == 1 and decoder.eager_steps == (0 if graph_chunk_ends else 12)
    else:
        assert decoder.end_captures == int(graph_chunk_ends)


def test_decoder_snapshot_is_independent() -> None:
    model = make_horizon().eval()
    tokens = _tokens(1, 12, seed=1)
    with torch.no_grad():
        decoder = GraphedDecoder(model, model(tokens[:, :2])[1])
        decoder.step(tokens[:, 2:3])
        snap = decoder.snapshot()
        before = [t.clone() for t in state_tensors(snap)]
        for t in range(3, 12):
            decoder.step(tokens[:, t : t + 1])
    for got_t, want_t in zip(state_tensors(snap), before, strict=True):
        assert torch.equal(got_t, want_t)


@pytest.mark.parametrize("kind", ["horizon", "transformer"])
def test_bf16_linears_casts_once_and_computes_the_same_under_autocast(kind: str) -> None:
    """The copy's Linear weights are bf16 and its steps under autocast cast none of them, where
    the original's cast every Linear weight they use; the logits are exactly the original's; the
    original keeps its float32 weights (and its tied head)."""
    model = (make_horizon if kind == "horizon" else make_transformer)(dtype=torch.float32).eval()
    shadow = bf16_linears(model)
    tokens = _tokens(2, 7)
    with torch.no_grad():
        state = model(tokens[:, :6])[1]
        runs = []
        for net in (model, shadow):
            linear = _linear_tensors(net)
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), _casts() as sources:
                if kind == "horizon":
                    logits = net(tokens[:, 6:], state)[0]  # (B, 1, V)
                else:
                    logits = net.forward_static(tokens[:, 6:], model.static_cache(state, 64, torch.bfloat16))
            runs.append((logits, len(linear & set(sources))))
    (want, cast_before), (got, cast_after) = runs
    assert torch.equal(got, want)
    assert cast_before > 10 and cast_after == 0, (cast_before, cast_after)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    cast = {p.dtype for m in shadow.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
    assert cast == {torch.bfloat16}
    if getattr(model.config, "tie_embeddings", False):
        assert model.head.weight is model.embed.weight and shadow.embed.weight.dtype == torch.float32


def test_bf16_decoders_step_over_the_cast_copy() -> None:
    """With bf16, each decoder steps the cast copy: HorizonLM's logits exactly those of the model
    under autocast step by step, across chunk ends (eager and replayed, fillers in the memory); the
    transformer's those of the same decoder stepping the original model."""
    model = make_horizon(dtype=torch.float32).eval()
    tokens = _tokens(2, 3 * model.config.chunk_size + 2)
    with torch.no_grad():
        state = model(tokens[:, :5])[1]
        decoder = GraphedDecoder(model, state, bf16=True)
        assert decoder.runner is not model
        want_state = state
        for t in range(5, tokens.shape[1]):
            got = decoder.step(tokens[:, t : t + 1])  # (B, V)
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                want, want_state = model(tokens[:, t : t + 1], want_state)  # (B, 1, V)
            assert torch.equal(got, want[:, -1]), t
        assert decoder.captures > 1 and decoder.eager_steps >= 1 and decoder.end_captures == 1  # every kind of step
        transformer = make_transformer(dtype=torch.float32).eval()
        state = transformer(tokens[:, :5])[1]
        cast = GraphedTransformerDecoder(transformer, state, capacity=16, bf16=True)
        plain = GraphedTransformerDecoder(transformer, state, capacity=16, bf16=True)
        plain.runner = transformer
        for t in range(5, 12):
            assert torch.equal(cast.step(tokens[:, t : t + 1]), plain.step(tokens[:, t : t + 1])), t

        def linear_casts(net, stepper) -> int:
            linear = _linear_tensors(net)
            with _casts() as sources:
                stepper.step(tokens[:, :1])
            return len(linear & set(sources))

        assert linear_casts(model, decoder) == 0 and linear_casts(transformer, cast) == 0  # steps use the copies
        uncast = GraphedDecoder(model, want_state, bf16=True)
        uncast.runner = model
        assert linear_casts(model, uncast) > 0 and linear_casts(transformer, plain) > 0  # the originals cast


def test_decoder_refuses_wrong_token_shape() -> None:
    model = make_horizon().eval()
    decoder = GraphedDecoder(model, model.init_state(2))
    with pytest.raises(ValueError, match="shape"):
        decoder.step(torch.zeros(1, 1, dtype=torch.long))  # would broadcast over the batch


@pytest.mark.parametrize("start", [0, 1, 9])
def test_transformer_decoder_matches_model_steps(start: int) -> None:
    model = make_transformer().eval()
    end = 40
    tokens = _tokens(2, end, seed=2)
    with torch.no_grad():
        state = model.init_state(2) if start == 0 else model(tokens[:, :start])[1]
        decoder = GraphedTransformerDecoder(model, state, capacity=end)
        want_state = state
        for t in range(start, end):
            got = decoder.step(tokens[:, t : t + 1])
            want, want_state = model(tokens[:, t : t + 1], want_state)
            torch.testing.assert_close(got, want[:, -1], rtol=1e-9, atol=1e-10)
    assert decoder.captures == 1
    assert int(decoder.cache.pos) == decoder.pos == end
    snap = decoder.snapshot()
    assert snap.pos == want_state.pos == end
    for got_t, want_t in zip(snap.keys + snap.values, want_state.keys + want_state.values, strict=True):
        torch.testing.assert_close(got_t, want_t, rtol=1e-9, atol=1e-10)


def test_transformer_forward_static_prefill_equals_forward() -> None:
    """Several tokens at once into a static cache: the causal mask over the slots."""
    model = make_transformer().eval()
    tokens = _tokens(2, 23, seed=3)
    with torch.no_grad():
        want, _ = model(tokens)
        cache = model.static_cache(model.init_state(2), capacity=32)
        first = model.forward_static(tokens[:, :10], cache)  # (B, 10, V)
        cache.pos.add_(10)
        second = model.forward_static(tokens[:, 10:], cache)  # (B, 13, V)
    torch.testing.assert_close(torch.cat([first, second], dim=1), want, rtol=1e-9, atol=1e-10)


def test_transformer_decoder_refuses_a_full_cache() -> None:
    model = make_transformer().eval()
    decoder = GraphedTransformerDecoder(model, model.init_state(1), capacity=1)
    assert decoder.cache.capacity == 64
    for _ in range(64):
        decoder.step(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="full"):
        decoder.step(torch.zeros(1, 1, dtype=torch.long))


def _pairs(counts: CountCacheState) -> list[tuple[dict[int, int], dict[int, int]]]:
    """Each stream's counted pairs of the current block and of the one before, as {item: count}:
    which of the current block's two tables holds a pair depends on how the stream was split into
    calls, the counts do not."""
    def row(items: torch.Tensor, counts: torch.Tensor) -> dict[int, int]:
        out: dict[int, int] = {}
        for item, count in zip(items.tolist(), counts.tolist(), strict=True):
            if item != PAD:
                out[item] = out.get(item, 0) + count
        return out

    t = counts.tables
    return [(row(torch.cat([t.items[b], t.recent_items[b]]), torch.cat([t.counts[b], t.recent_counts[b]])),
             row(t.prev_items[b], t.prev_counts[b])) for b in range(t.items.shape[0])]


@pytest.mark.parametrize("graph_chunk_ends", [False, True])
def test_decoder_with_the_count_cache_replays_and_mixes_every_step(graph_chunk_ends: bool) -> None:
    """The count cache's tables change size every step, so they stay outside the replay: the
    backbone replays as without the cache (chunk ends eager or replayed) and the cache mixes each
    step's logits eagerly. Four symbols make contexts recur, so the counts shape the logits; the
    logits and the whole state, the counts included, equal the model's step by step."""
    model = make_horizon(count_lengths=(1, 2, 4), count_capacity=40, use_memory=False).eval()
    chunk = model.config.chunk_size
    tokens = torch.randint(0, 4, (2, 6 * chunk + 3), generator=torch.Generator().manual_seed(4))  # (B, T)
    decoder, want_state, _ = _decode_alongside(model, tokens, 3, graph_chunk_ends=graph_chunk_ends)
    assert decoder.captures == 1 and decoder.eager_steps == (0 if graph_chunk_ends else 6)
    snap = decoder.snapshot()
    _assert_same_state(snap, want_state)
    assert _pairs(snap.counts) == _pairs(want_state.counts)
    assert torch.equal(snap.counts.tail, want_state.counts.tail) and snap.counts.pos == want_state.counts.pos
    more = torch.randint(0, 4, (2, 50), generator=torch.Generator().manual_seed(5))  # (B, 50): across a block end
    with torch.no_grad():
        torch.testing.assert_close(model(more, snap)[0], model(more, want_state)[0], rtol=1e-9, atol=1e-10)
    with torch.no_grad():
        plain = torch.log_softmax(model.backbone(tokens, model.init_state(2))[0], -1)  # (B, T, V)
        assert (model(tokens)[0] - plain).abs().max() > 1e-2  # the counts took part
