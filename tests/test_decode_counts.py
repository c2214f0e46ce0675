"""The count cache on the host, a token at a time (decode_counts.HostCounts), against the definition."""

from __future__ import annotations

import pytest
import torch

from horizonlm.decode_counts import HostCounts
from horizonlm.ops.count_cache import count_cache_call, count_reference, empty_tables
from horizonlm.state import CountCacheState

LENGTHS, VOCAB, CAPACITY = (1, 2, 3, 5), 4, 37


def _start(tokens: torch.Tensor, recent: int) -> CountCacheState:
    """The batched path's state after ``tokens`` (B, T), fed in uneven calls; ``recent`` small
    puts pairs in both of the current block's tables."""
    batch = tokens.shape[0]
    tables = empty_tables(batch)
    tail = torch.full((batch, max(LENGTHS)), -1, dtype=torch.int64)  # (B, span)
    pos = 0
    for size in (5, 17, 1, 40, 3, 60):
        piece = tokens[:, pos:pos + size]  # (B, <= size)
        if piece.shape[1] == 0:
            break
        _, tables, tail = count_cache_call(tables, tail, pos, piece, LENGTHS, VOCAB, CAPACITY, recent=recent)
        pos += piece.shape[1]
    return CountCacheState(tables, tail=tail, pos=pos)


@pytest.mark.parametrize("prefix", [0, 7, 95])
@pytest.mark.parametrize("recent", [4, 1 << 16])
def test_steps_equal_the_definition_across_block_ends(prefix: int, recent: int) -> None:
    """From a state the batched path made (empty, inside the first block, two blocks on), every
    decoded token's counts, totals and chosen length are the definition's, through three block
    ends; the state it hands back, continued by the batched path, still is."""
    tokens = torch.randint(0, VOCAB, (3, prefix + 130), generator=torch.Generator().manual_seed(prefix + recent))
    host = HostCounts(_start(tokens[:, :prefix], recent), LENGTHS, VOCAB, CAPACITY)
    got = [host.step(tokens[:, t].tolist()) for t in range(prefix, prefix + 100)]
    state = host.state()
    assert state.pos == prefix + 100
    rest, _, _ = count_cache_call(state.tables, state.tail, state.pos, tokens[:, prefix + 100:], LENGTHS, VOCAB,
                                  CAPACITY)
    for b in range(tokens.shape[0]):
        counts, totals, chosen = count_reference(tokens[b].tolist(), LENGTHS, VOCAB, CAPACITY)  # (T, V), (T, n), (T,)
        steps = slice(prefix, prefix + 100)
        assert torch.equal(torch.cat([look.counts[b] for look in got]), counts[steps].int())
        assert torch.equal(torch.cat([look.totals[b] for look in got]), totals[steps])
        assert torch.equal(torch.cat([look.chosen[b] for look in got]), chosen[steps])
        assert torch.equal(rest.counts[b], counts[prefix + 100:].int())
        assert torch.equal(rest.chosen[b], chosen[prefix + 100:])
    assert (torch.cat([look.chosen for look in got], dim=1) >= 0).float().mean() > 0.5  # the counts were asked


def test_a_step_needs_one_token_per_stream() -> None:
    host = HostCounts(_start(torch.zeros(2, 0, dtype=torch.int64), 4), LENGTHS, VOCAB, CAPACITY)
    with pytest.raises(ValueError, match="one per stream"):
        host.step([1, 2, 3])
