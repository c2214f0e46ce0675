"""Property tests: shapes, dtypes and lengths around the chunk size, split anywhere, and streams
long enough that the memory evicts (more completed chunks than ``memory_capacity``)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from horizonlm import HorizonConfig, HorizonLM

CFG = HorizonConfig.preset("tiny")
C = CFG.chunk_size
M = CFG.memory_capacity
torch.manual_seed(0)
MODEL = HorizonLM(CFG).eval()
LENGTHS = st.sampled_from([1, C - 1, C, C + 1, 3 * C + 2, 5 * C, (M + 1) * C, (M + 3) * C + 5])
EVICTING_LENGTHS = st.integers((M + 1) * C, (M + 5) * C + C - 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), length=LENGTHS, data=st.data())
def test_shapes_dtypes_and_any_split(batch: int, length: int, data) -> None:
    seed = data.draw(st.integers(0, 2**16))
    tokens = torch.randint(0, CFG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    cut = data.draw(st.integers(0, length))
    with torch.no_grad():
        logits, state = MODEL(tokens)
        assert logits.shape == (batch, length, CFG.vocab_size)
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
        assert state.pos == length and state.batch_size == batch
        assert state.blocks[0].ssm.shape[0] == batch
        first = max(0, length // C - M) * C  # the induction memory keeps one entry per token from here
        assert state.memory.chunk_ids.tolist() == [p // C for p in range(first, length)]
        assert state.memory.keys.shape[1] == length - first
        if 0 < cut < length:
            first, mid = MODEL(tokens[:, :cut])
            second, _ = MODEL(tokens[:, cut:], mid)
            assert _rel(torch.cat([first, second], dim=1), logits) < 1e-5


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 2), length=EVICTING_LENGTHS, data=st.data())
def test_evicting_stream_in_pieces_equals_one_call(batch: int, length: int, data) -> None:
    """The FIFO: pieces that cross the eviction point give one call's logits, and the memory
    they leave is one call's, entry for entry (the newest M chunks' and the pending tokens',
    oldest first)."""
    seed = data.draw(st.integers(0, 2**16))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, length - 1), min_size=1, max_size=4))))
    tokens = torch.randint(0, CFG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full, full_state = MODEL(tokens)
        state, pieces = None, []
        for a, b in zip([0, *cuts], [*cuts, length]):
            logits, state = MODEL(tokens[:, a:b], state)
            pieces.append(logits)
    streamed = torch.cat(pieces, dim=1)  # (B, T, V)
    assert _rel(streamed, full) < 1e-5
    assert (streamed - full).abs().max().item() < 1e-4
    completed = length // C
    want_ids = [p // C for p in range((completed - M) * C, length)]
    assert full_state.memory.chunk_ids.tolist() == state.memory.chunk_ids.tolist() == want_ids
    assert state.memory.keys.shape == full_state.memory.keys.shape == (batch, len(want_ids), CFG.memory_dim)
    torch.testing.assert_close(state.memory.keys, full_state.memory.keys, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.memory.values, full_state.memory.values, rtol=1e-4, atol=1e-5)
