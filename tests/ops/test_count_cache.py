"""The count cache's exact counts against their definition (direct comparison of token lists)."""

from __future__ import annotations

import pytest
import torch

from horizonlm.ops.count_cache import (
    PAD,
    RECENT,
    block_segments,
    context_keys,
    context_keys_reference,
    count_cache_call,
    count_reference,
    empty_tables,
    merge_counts,
    second_modulus,
)

LENGTHS = (1, 2, 4)


def _run(tokens: torch.Tensor, sizes: list[int], lengths: tuple[int, ...], vocab: int, capacity: int,
         recent: int = RECENT):
    tables = empty_tables(tokens.shape[0])
    tail = torch.full((tokens.shape[0], max(lengths)), -1, dtype=torch.int64)  # (B, span)
    looks, pos = [], 0
    for size in sizes:
        look, tables, tail = count_cache_call(tables, tail, pos, tokens[:, pos:pos + size], lengths, vocab, capacity,
                                              recent)
        looks.append(look)
        pos += size
    return [torch.cat(parts, dim=1) for parts in zip(*looks)], tables


@pytest.mark.parametrize(("capacity", "recent"), [(3, RECENT), (7, RECENT), (1000, RECENT), (7, 4), (1000, 4)])
@pytest.mark.parametrize("seed", range(4))
def test_counts_equal_the_definition_for_any_split(seed: int, capacity: int, recent: int) -> None:
    """Three tokens make every context recur: counts, totals and the chosen length equal a direct
    search over the token lists at every position, for one call and for random pieces, with blocks
    of 3 and 7 positions evicting entries and without eviction, the small table merged into the
    large one after every few pairs (4) or never."""
    g = torch.Generator().manual_seed(seed)
    vocab, size = 3, 70
    tokens = torch.randint(0, vocab, (2, size), generator=g)  # (B, T)
    cuts = sorted(set(torch.randint(1, size, (6,), generator=g).tolist()))
    pieces = [b - a for a, b in zip([0] + cuts, cuts + [size])]
    for sizes in ([size], pieces, [1] * size):
        (counts, totals, chosen), _ = _run(tokens, sizes, LENGTHS, vocab, capacity, recent)
        for b in range(2):
            want_counts, want_totals, want_chosen = count_reference(tokens[b].tolist(), LENGTHS, vocab, capacity)
            assert torch.equal(totals[b], want_totals)
            assert torch.equal(chosen[b], want_chosen)
            assert torch.equal(counts[b].long(), want_counts)
    assert (chosen == len(LENGTHS) - 1).any() and (chosen == -1).any()  # the check sees every case


def test_the_state_holds_two_blocks_of_distinct_pairs() -> None:
    """Blocks of 10 positions, contexts of 1 and 3 tokens: after 100 tokens the tables hold
    exactly the distinct pairs completed in positions 80-89 and 90-99, counted."""
    tokens = torch.randint(0, 3, (1, 100), generator=torch.Generator().manual_seed(1))  # (1, T)
    _, tables = _run(tokens, [9] * 11 + [1], (1, 3), 3, capacity=10, recent=4)
    assert tables.items.shape[1] and tables.recent_items.shape[1]  # both parts of the current block in use
    current = merge_counts(tables.items, tables.counts, tables.recent_items, tables.recent_counts)
    for (items, counts), first in (((tables.prev_items, tables.prev_counts), 80), (current, 90)):
        assert torch.equal(items, items.sort(dim=1).values) and (items != PAD).all()
        assert int(counts.sum()) == 2 * 10  # one pair per length for each completing token
        assert items.unique().numel() == items.shape[1]  # each pair once
        pairs = {(tuple(tokens[0, q - n:q].tolist()), int(tokens[0, q])) for n in (1, 3) for q in range(first, first + 10)}
        assert items.shape[1] == len(pairs)


def test_merge_counts_equals_counting_everything() -> None:
    g = torch.Generator().manual_seed(2)
    old = torch.randint(0, 6, (3, 20), generator=g)  # (B, N): repeats
    items, counts = merge_counts(*empty_tables(3)[:2], old, torch.ones_like(old))
    new = torch.randint(0, 6, (3, 9), generator=g)  # (B, m)
    new[0, :3] = PAD  # nothing to add there
    items, counts = merge_counts(items, counts, new, (new != PAD).long())
    for b in range(3):
        everything = torch.cat([old[b], new[b][new[b] != PAD]])  # (N + m',)
        values, numbers = everything.unique(return_counts=True)
        real = items[b] != PAD
        assert torch.equal(items[b][real], values) and torch.equal(counts[b][real], numbers)
        assert (counts[b][~real] == 0).all()
    assert torch.equal(items, items.sort(dim=1).values)


def test_block_segments_split_where_blocks_begin() -> None:
    assert block_segments(0, 5, 10) == [(0, 5)]
    assert block_segments(8, 5, 10) == [(0, 2), (2, 5)]
    assert block_segments(10, 25, 10) == [(0, 10), (10, 20), (20, 25)]
    assert block_segments(3, 1, 4) == [(0, 1)]


def test_keys_name_their_context_and_nothing_before_the_stream() -> None:
    ext = torch.tensor([[-1, -1, 5, 6, 7, 5, 6, 7, 5, 6]])  # (1, S)
    keys = context_keys(ext, (1, 2, 3), 256)  # (1, S, 3)
    assert (keys[0, :2] == -1).all() and keys[0, 2, 1] == -1 and keys[0, 3, 2] == -1
    assert keys[0, 5, 2] == keys[0, 8, 2] and keys[0, 6, 1] == keys[0, 9, 1]  # 5 6 7 ... 5 6 7
    assert keys[0, 5, 0] != keys[0, 6, 0] and keys[0, 8, 2] != keys[0, 9, 2]
    assert keys[0, 2, 0] != keys[0, 2:, 1].max()  # one token is not two
    assert int(keys.max()) * 256 + 256 < 2 ** 63
    assert int(keys.max()) < 2 ** 31 * second_modulus(256)


def test_keys_fit_beside_a_large_vocabulary() -> None:
    vocab = 1 << 20
    ext = torch.randint(0, vocab, (1, 200), generator=torch.Generator().manual_seed(3))  # (1, S)
    keys = context_keys(ext, (1, 8), vocab)  # (1, S, 2)
    assert int(keys.max()) * vocab + vocab < 2 ** 63
    assert keys[0, 7:, 1].unique().numel() == 193  # no two random 8-token contexts collide


@pytest.mark.parametrize("vocab", [2, 256, 1 << 20])
def test_keys_equal_horners_rule(vocab: int) -> None:
    """One reduction per length gives the hashes of the token-by-token loop, exactly, with and
    without positions before the stream start, at the largest length and vocabulary allowed."""
    gen = torch.Generator().manual_seed(vocab)
    for lengths, before in (((1, 2, 3), 0), ((8, 12, 16, 24, 32, 48, 64), 5), ((1, 64), 70), ((3,), 300)):
        ext = torch.randint(0, vocab, (3, 150), generator=gen)  # (B, S)
        ext[:, :before] = -1
        assert torch.equal(context_keys(ext, lengths, vocab), context_keys_reference(ext, lengths, vocab))


def test_an_empty_call_changes_nothing() -> None:
    tokens = torch.randint(0, 4, (2, 500), generator=torch.Generator().manual_seed(5))  # (B, T)
    tables, tail = empty_tables(2), torch.full((2, 8), -1, dtype=torch.int64)  # (B, span)
    _, tables, tail = count_cache_call(tables, tail, 0, tokens, (2, 8), 4, 1 << 21, recent=4)
    assert tables.items.shape[1] > 0  # the large table holds pairs: a call of few queries reads it run by run
    look, after, tail_after = count_cache_call(tables, tail, 500, tokens[:, :0], (2, 8), 4, 1 << 21, recent=4)
    assert look.counts.shape == (2, 0, 4) and look.chosen.shape == (2, 0)
    assert all(torch.equal(a, b) for a, b in zip(after, tables)) and torch.equal(tail_after, tail)
