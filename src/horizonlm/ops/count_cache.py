"""The count cache: exact counts of what followed each earlier occurrence of a token's context.

For stream position t and context length n (one of ``lengths``), over the earlier positions
p < t whose last n tokens equal t's (``x[p-n+1..p] == x[t-n+1..t]``), the cache counts which token
came next: ``c_n(t, v) = #{p : x[p+1] = v}``, ``T_n(t) = sum_v c_n(t, v)``. It reports the longest
length with ``T_n(t) > 0`` (the ``chosen`` one, -1 if none) and that length's counts: an exact
n-gram "cache" over the whole visible stream (Kuhn & De Mori 1990; the longest-match back-off of
PPM, Cleary & Witten 1984), which the model mixes into its next-token distribution
(:class:`horizonlm.layers.count_cache.CountCache`).

Visibility follows the stream in blocks of ``capacity`` positions: the entry of p counts for t
when ``(p + 1) // capacity >= t // capacity - 1``, i.e. the token that completed it (p + 1) lies
in t's block or the one before. The rule depends on p and t alone, so any split of the stream
into calls gives the same counts, and the state holds two blocks' pairs at most.

A table holds each distinct ``(context, next token)`` pair once, as the sorted int64 item
``key * V + next`` with its count, so a context's counts are one contiguous run found by two
binary searches, at most V items long. ``key`` hashes the context (two polynomial hashes modulo
primes, about 62 - log2(V) bits: at V=256, 2**54 keys, so the 35M contexts of a 5M-byte book at
seven lengths would hold about 0.03 colliding pairs if the hash spreads them evenly). Rows of a batch hold different numbers of pairs: shorter rows end in
:data:`PAD` items with count 0.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["PAD", "CountLookup", "CountTables", "block_segments", "check_count_cache_device", "context_keys",
           "context_keys_reference", "count_cache_call", "count_lookup", "count_reference", "empty_tables",
           "merge_counts"]

HASH_M1 = 2147483647
"""The first hash's modulus (2**31 - 1, prime): h1 * P1 stays below 2**62."""
HASH_P1 = 1000003
"""The first hash's base."""
HASH_P2 = 9973
"""The second hash's base (its modulus depends on V: :func:`second_modulus`)."""


def _prime_below(n: int) -> int:
    """The largest prime below n (trial division; n is at most 2**31)."""
    for m in range(n - 1, 1, -1):
        if all(m % d for d in range(2, int(m ** 0.5) + 1)):
            return m
    raise ValueError(f"no prime below {n}")


@cache
def second_modulus(vocab: int) -> int:
    """The second hash's modulus: ``key * V + V`` must stay below 2**63, and ``key < 2**31 * m2``.
    Cached: every call of the cache asks for it, and the prime search takes 0.16 ms."""
    return _prime_below(2 ** (31 - max(vocab - 1, 1).bit_length()))


class CountLookup(NamedTuple):
    """What a call learns from the cache, per position of the call."""

    counts: Tensor
    """c_n(t, v) of the chosen length (zeros where none). (B, L, V) int32"""
    totals: Tensor
    """T_n(t) of every length. (B, L, n_lengths) int64"""
    chosen: Tensor
    """Index into ``lengths`` of the longest length with T_n(t) > 0, -1 if none. (B, L) int64"""


def context_keys(ext: Tensor, lengths: tuple[int, ...], vocab: int) -> Tensor:
    """The hashed context ending at each position of ``ext`` (B, S) for every length: -1 where the
    context reaches before ``ext``'s start or holds a -1 (before the stream start). (B, S, n)

    Each hash is ``sum_k (x_k + 2) P**k mod M`` over the context's tokens x_0..x_{n-1} in stream
    order, the powers taken mod M first: a term is below (V + 2) * 2**31 and 64 of them (the
    longest length allowed) below 2**57 at V = 2**20 (the largest vocabulary allowed), so the sums
    are exact in int64, and one reduction per length replaces :func:`context_keys_reference`'s
    loop over the positions back (some ten kernels each, on a GPU)."""
    m2 = second_modulus(vocab)
    batch, size = ext.shape
    span = max(lengths)
    padded = torch.cat([ext.new_full((batch, span - 1), -1), ext], dim=1)  # (B, span - 1 + S)
    windows = padded.unfold(1, span, 1)  # (B, S, span): the span tokens up to each position, oldest first
    reach = torch.arange(span, 0, -1, device=ext.device)  # (span,): how far back each window column lies
    nearest_bad = torch.where(windows < 0, reach, span + 1).amin(-1)  # (B, S): the nearest -1 back
    p1, p2 = _powers(HASH_P1, HASH_M1, span, ext.device), _powers(HASH_P2, m2, span, ext.device)  # (span,) twice
    keys = []
    for n in lengths:
        tail = windows[:, :, span - n:] + 2  # (B, S, n)
        h1 = (tail * p1[:n]).sum(-1) % HASH_M1  # (B, S)
        h2 = (tail * p2[:n]).sum(-1) % m2  # (B, S)
        keys.append(torch.where(nearest_bad > n, h1 * m2 + h2, -1))  # (B, S)
    return torch.stack(keys, dim=-1)  # (B, S, n)


def _powers(base: int, modulus: int, count: int, device: torch.device) -> Tensor:
    """``base**k mod modulus`` for k = 0..count-1. (count,) int64"""
    out, value = [], 1
    for _ in range(count):
        out.append(value)
        value = value * base % modulus
    return torch.tensor(out, dtype=torch.int64, device=device)  # (count,)


def context_keys_reference(ext: Tensor, lengths: tuple[int, ...], vocab: int) -> Tensor:
    """:func:`context_keys` by Horner's rule, a token back at a time. (B, S, n)"""
    m2 = second_modulus(vocab)
    batch, size = ext.shape
    keys = ext.new_full((batch, size, len(lengths)), -1)  # (B, S, n)
    h1 = ext.new_zeros(batch, size)  # (B, S)
    h2 = ext.new_zeros(batch, size)  # (B, S)
    valid = torch.ones_like(ext, dtype=torch.bool)  # (B, S)
    for back in range(max(lengths)):
        tok = torch.full_like(ext, -1)  # (B, S): the token `back` places before each position
        tok[:, back:] = ext[:, : size - back]
        valid = valid & (tok >= 0)
        h1 = (h1 * HASH_P1 + tok + 2) % HASH_M1  # (B, S)
        h2 = (h2 * HASH_P2 + tok + 2) % m2  # (B, S)
        if back + 1 in lengths:
            i = lengths.index(back + 1)
            keys[:, :, i] = torch.where(valid, h1 * m2 + h2, -1)
    return keys


PAD = torch.iinfo(torch.int64).max
"""The item that fills a table's row past its pairs (sorts last, count 0)."""


RECENT = 1 << 16
"""Items the current block's small table may hold before it is merged into the large one (or an
eighth of the large one's, if more): a call's pairs are merged into the small table, so a short
call (a decoding step) costs little however long the stream, and the large table is rewritten
only once in many calls."""


class CountTables(NamedTuple):
    """The pairs of the current block (a large and a small table) and of the one before, per stream.
    Which of the current block's tables holds a pair depends on how the stream was split into
    calls; the counts, their sum, do not."""

    items: Tensor
    """The current block's large table: ``key * V + next``, ascending, PAD-filled. (B, U) int64"""
    counts: Tensor
    """How often each item occurred (0 for PAD). (B, U) int64"""
    recent_items: Tensor
    """The current block's small table: the pairs of the latest calls. (B, U'') int64"""
    recent_counts: Tensor
    """Their counts. (B, U'') int64"""
    prev_items: Tensor
    """The previous block's items. (B, U') int64"""
    prev_counts: Tensor
    """The previous block's counts. (B, U') int64"""


def empty_tables(batch: int, device: torch.device | str | None = None) -> CountTables:
    empty = torch.empty(batch, 0, dtype=torch.int64, device=device)  # (B, 0)
    return CountTables(*(empty.clone() for _ in range(6)))


def merge_counts(items: Tensor, counts: Tensor, new: Tensor, new_counts: Tensor) -> tuple[Tensor, Tensor]:
    """The table ``items``/``counts`` (B, N) with the items ``new`` (B, m) added (PAD: none), in
    O(N + m log m): each old item moves up by the new ones below it, each new one by the old ones
    at or below it; equal items then become one with their counts summed. Returns (B, U) twice."""
    new_sorted, order = new.sort(dim=1)  # (B, m)
    new_counts = new_counts.gather(1, order)  # (B, m)
    batch, n_old = items.shape
    m = new.shape[1]
    ins = torch.searchsorted(items, new_sorted, right=True)  # (B, m): old items at or below each new one
    below = torch.zeros(batch, n_old + 1, dtype=torch.int64, device=new.device).scatter_add_(
        1, ins, torch.ones_like(ins)).cumsum(dim=1)[:, :n_old]  # (B, N): new items below each old one
    merged = items.new_empty(batch, n_old + m)  # (B, N + m)
    merged_counts = counts.new_empty(batch, n_old + m)  # (B, N + m)
    at_old = torch.arange(n_old, device=new.device) + below  # (B, N)
    at_new = ins + torch.arange(m, device=new.device)  # (B, m)
    merged.scatter_(1, at_old, items).scatter_(1, at_new, new_sorted)
    merged_counts.scatter_(1, at_old, counts).scatter_(1, at_new, new_counts)
    real = merged != PAD  # (B, N + m)
    first = real.clone()  # (B, N + m)
    first[:, 1:] &= merged[:, 1:] != merged[:, :-1]
    group = first.cumsum(dim=1) - 1  # (B, N + m): each item's place in the result
    size = int(first.sum(dim=1).max()) if merged.numel() else 0
    slot = torch.where(real, group, size)  # (B, N + m): PAD items go to a column that is dropped
    out = torch.full((batch, size + 1), PAD, dtype=torch.int64, device=new.device)  # (B, U + 1)
    out.scatter_(1, torch.where(first, slot, size), merged)
    out_counts = torch.zeros(batch, size + 1, dtype=torch.int64, device=new.device)  # (B, U + 1)
    out_counts.scatter_add_(1, slot, merged_counts)
    return out[:, :size].contiguous(), out_counts[:, :size].contiguous()


def _run_slots(lo: Tensor, hi: Tensor, width: int, size: int) -> tuple[Tensor, Tensor]:
    """The table indices of runs [lo, hi) (B, Q), ``width`` a run (the longest), clamped into a
    table of ``size`` items, and which of them lie inside their run. (B, Q, R) twice"""
    at = lo.unsqueeze(-1) + torch.arange(width, device=lo.device)  # (B, Q, R)
    return at.clamp(max=size - 1), at < hi.unsqueeze(-1)  # (B, Q, R) twice


def _runs(items: Tensor, counts: Tensor, keys: Tensor, vocab: int) -> tuple[Tensor, Tensor, Tensor]:
    """Where each key's items lie in a table, [lo, hi), and their total count. keys (B, L, n) ->
    (B, L, n) three times.

    A run holds at most V items: few queries against a large table (decoding, a token a call) sum
    their runs' counts directly; many (training) take differences of the table's prefix sums,
    whose O(U) pass then costs less than the runs."""
    batch, size = keys.shape[0], items.shape[1]
    lo = torch.searchsorted(items, (keys * vocab).reshape(batch, -1))  # (B, L * n)
    hi = torch.searchsorted(items, (keys * vocab + vocab).reshape(batch, -1))  # (B, L * n)
    if 0 < keys.numel() * vocab < items.numel():
        at, inside = _run_slots(lo, hi, int((hi - lo).max()), size)  # (B, L * n, R) twice
        run_counts = counts.gather(1, at.view(batch, -1)).view(at.shape)  # (B, L * n, R)
        total = torch.where(inside, run_counts, 0).sum(-1)  # (B, L * n)
    else:
        prefix = torch.cat([counts.new_zeros(batch, 1), counts.cumsum(dim=1)], dim=1)  # (B, U + 1)
        total = prefix.gather(1, hi) - prefix.gather(1, lo)  # (B, L * n)
    return lo.view(keys.shape), hi.view(keys.shape), total.view(keys.shape)


def _add_run_counts(out: Tensor, items: Tensor, counts: Tensor, lo: Tensor, hi: Tensor, key: Tensor, vocab: int,
                    width: int) -> None:
    """Add to ``out`` (B, L, V) the counts by next token of the runs [lo, hi) (B, L) of ``key`` (B, L);
    ``width``: the longest run, which the caller reads for all tables at once (one host sync)."""
    if width == 0:
        return
    batch, length = key.shape
    at, inside = _run_slots(lo, hi, width, items.shape[1])  # (B, L, R) twice
    at = at.view(batch, -1)  # (B, L * R)
    nxt = torch.where(inside, items.gather(1, at).view(batch, length, width) - (key * vocab).unsqueeze(-1), 0)  # (B, L, R)
    out.scatter_add_(2, nxt, torch.where(inside, counts.gather(1, at).view(batch, length, width), 0).to(out.dtype))


def _earlier_same_key(keys: Tensor) -> Tensor:
    """For each position k of a call's keys (B, S), how many earlier positions k' < k hold the same key. (B, S)"""
    batch, size = keys.shape
    ks, order = keys.sort(dim=1, stable=True)  # (B, S): ties keep stream order
    idx = torch.arange(size, device=keys.device).expand(batch, size)  # (B, S)
    start = torch.ones_like(ks, dtype=torch.bool)  # (B, S)
    start[:, 1:] = ks[:, 1:] != ks[:, :-1]
    first = torch.where(start, idx, 0).cummax(dim=1).values  # (B, S): where each one's group begins
    return torch.empty_like(idx).scatter_(1, order, idx - first)  # (B, S)


def _call_table(entries: Tensor, n_len: int) -> tuple[Tensor, Tensor]:
    """A call's own items ``entries`` (B, L * n), position-major (index ``k' * n + length``: every
    length's context ending before call position k', followed by the token at k'; PAD for none), as
    a table: its distinct items ascending, PAD-filled to L * n, and, sorted, ``rank * (L + 1) + k'``
    for every entry (the positions of each distinct item, in order). (B, L * n) twice

    Keys of different lengths are told apart by their hash, as different contexts of one length
    are, and as the stored tables do."""
    batch, size = entries.shape[0], entries.shape[1] // n_len + 1
    items, order = entries.sort(dim=1, stable=True)  # (B, L * n): equal items keep stream order
    first = torch.ones_like(items, dtype=torch.bool)  # (B, L * n)
    first[:, 1:] = items[:, 1:] != items[:, :-1]
    rank = first.cumsum(dim=1) - 1  # (B, L * n): which distinct item
    by_rank = rank * size + order // n_len  # (B, L * n): ascending
    width = entries.shape[1]
    distinct = torch.full((batch, width + 1), PAD, dtype=torch.int64, device=entries.device)  # (B, L * n + 1)
    distinct.scatter_(1, torch.where(first, rank, width), items)
    return distinct[:, :width].contiguous(), by_rank


def _add_earlier_counts(out: Tensor, distinct: Tensor, by_rank: Tensor, lo: Tensor, hi: Tensor, query: Tensor,
                        vocab: int, width: int) -> None:
    """Add to ``out`` (B, L, V), for each query j = 0..L-1 of a call (``query`` (B, L): a key, -1 for
    none), how often each token followed that key at the call's positions k' <= j, from the call's
    table (:func:`_call_table`): a query's items are its run [lo, hi) (B, L) of at most V distinct
    items (``width``: the longest), and an item's earlier positions are one binary search."""
    if width == 0:
        return
    batch, length = query.shape
    size = length + 1
    u, inside = _run_slots(lo, hi, width, distinct.shape[1])  # (B, L, R) twice
    inside &= (query >= 0).unsqueeze(-1)  # (B, L, R)
    k = torch.arange(1, size, device=query.device).view(1, -1, 1)  # (1, L, 1): entries before it lie at k' < j + 1
    before = torch.searchsorted(by_rank, (u * size + k).reshape(batch, -1)).view(u.shape)  # (B, L, R)
    starts = torch.searchsorted(by_rank, (u * size).reshape(batch, -1)).view(u.shape)  # (B, L, R)
    token = distinct.gather(1, u.view(batch, -1)).view(u.shape) - (query * vocab).unsqueeze(-1)  # (B, L, R)
    out.scatter_add_(2, torch.where(inside, token, 0), torch.where(inside, before - starts, 0).to(out.dtype))


def count_lookup(tables: CountTables, tail: Tensor, tokens: Tensor, lengths: tuple[int, ...], vocab: int
                 ) -> tuple[CountLookup, Tensor]:
    """The cache's counts for one call that does not cross a block boundary.

    tables: the pairs visible before the call. tail (B, max(lengths)): the tokens before the call
    (-1 before the stream start). tokens (B, L). Returns the lookup and the call's L new items per
    length (B, L * n), PAD where a context reached before the stream start: the context ending at
    the token before the call, then at each of the call's tokens but the last (whose next token is
    not known yet)."""
    batch, length = tokens.shape
    n_len, span = len(lengths), tail.shape[1]
    ext = torch.cat([tail, tokens], dim=1)  # (B, span + L)
    keys = context_keys(ext, lengths, vocab)[:, span - 1:]  # (B, L + 1, n): index k = context ending at call position k - 1
    query = keys[:, 1:]  # (B, L, n)
    entry_keys = keys[:, :-1]  # (B, L, n): followed by the call's tokens
    new = torch.where(entry_keys >= 0, entry_keys * vocab + tokens.unsqueeze(-1), PAD).reshape(batch, -1)  # (B, L * n)
    pairs = ((tables.items, tables.counts), (tables.recent_items, tables.recent_counts),
             (tables.prev_items, tables.prev_counts))
    runs = [_runs(items, counts, query, vocab) for items, counts in pairs]  # (B, L, n) x3 per table
    totals = sum(run[2] for run in runs)  # (B, L, n)
    totals += _earlier_same_key(keys.reshape(batch, -1)).view(keys.shape)[:, 1:]  # (B, L, n): every length at once
    totals = torch.where(query >= 0, totals, 0)  # (B, L, n)
    hit = totals > 0  # (B, L, n)
    chosen = torch.where(hit.any(-1), n_len - 1 - hit.flip(-1).int().argmax(-1), -1)  # (B, L)
    pick = chosen.clamp(min=0).unsqueeze(-1)  # (B, L, 1)
    key = query.gather(2, pick).squeeze(-1)  # (B, L)
    # where no length occurred, the first length's total is 0: its runs are empty and add nothing
    spans = [(lo.gather(2, pick).squeeze(-1), hi.gather(2, pick).squeeze(-1)) for lo, hi, _ in runs]  # (B, L) x2 each
    distinct, by_rank = _call_table(new, n_len)  # (B, L * n) twice
    own = torch.where(chosen >= 0, key, -1)  # (B, L): the chosen key, or none
    own_lo = torch.searchsorted(distinct, own * vocab)  # (B, L)
    spans.append((own_lo, torch.searchsorted(distinct, own * vocab + vocab)))  # (B, L) x2
    widths = torch.stack([(hi - lo).amax() for lo, hi in spans]).tolist() if length else [0] * len(spans)
    counts = torch.zeros(batch, length, vocab, dtype=torch.int32, device=tokens.device)  # (B, L, V)
    for (items, table_counts), (lo, hi), width in zip(pairs, spans, widths):
        _add_run_counts(counts, items, table_counts, lo, hi, key, vocab, width)
    _add_earlier_counts(counts, distinct, by_rank, *spans[-1], own, vocab, widths[-1])
    return CountLookup(counts=counts, totals=totals, chosen=chosen), new


def block_segments(pos: int, length: int, capacity: int) -> list[tuple[int, int]]:
    """The call's [start, end) pieces, relative to the call, split where a block of ``capacity``
    stream positions begins."""
    cuts = [0]
    first = (pos // capacity + 1) * capacity - pos
    cuts.extend(range(first, length, capacity))
    cuts.append(length)
    return list(zip(cuts[:-1], cuts[1:]))


def count_cache_call(tables: CountTables, tail: Tensor, pos: int, tokens: Tensor, lengths: tuple[int, ...],
                     vocab: int, capacity: int, recent: int = RECENT) -> tuple[CountLookup, CountTables, Tensor]:
    """One call of the cache from its state: the lookup for every token of ``tokens`` (B, L), and
    the tables and last max(lengths) tokens (B, span) after them. ``pos``: the stream position of
    the call's first token. Where a block begins, the current table becomes the previous one and
    the previous one is dropped. ``recent``: see :data:`RECENT`."""
    looks = []
    for start, end in block_segments(pos, tokens.shape[1], capacity):
        if (pos + start) % capacity == 0 and pos + start > 0:  # a block begins: the current one becomes the previous
            items, counts = merge_counts(tables.items, tables.counts, tables.recent_items, tables.recent_counts)
            tables = CountTables(*empty_tables(tokens.shape[0], tokens.device)[:4], items, counts)
        look, new = count_lookup(tables, tail, tokens[:, start:end], lengths, vocab)
        fresh, fresh_counts = merge_counts(tables.recent_items, tables.recent_counts, new, (new != PAD).long())
        if fresh.shape[1] > max(recent, tables.items.shape[1] // 8):
            items, counts = merge_counts(tables.items, tables.counts, fresh, fresh_counts)  # (B, U) twice
            tables = tables._replace(items=items, counts=counts, recent_items=fresh[:, :0], recent_counts=fresh[:, :0])
        else:
            tables = tables._replace(recent_items=fresh, recent_counts=fresh_counts)
        tail = torch.cat([tail, tokens[:, start:end]], dim=1)[:, -tail.shape[1]:]  # (B, span)
        looks.append(look)
    lookup = CountLookup(*(torch.cat(parts, dim=1) for parts in zip(*looks)))
    return lookup, tables, tail


def count_reference(stream: list[int], lengths: tuple[int, ...], vocab: int, capacity: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The definition, by direct comparison of token lists (no hashing): counts (T, V), totals
    (T, n) and chosen (T,) for every position of one stream. Quadratic; for tests."""
    size = len(stream)
    counts = torch.zeros(size, vocab, dtype=torch.int64)  # (T, V)
    totals = torch.zeros(size, len(lengths), dtype=torch.int64)  # (T, n)
    chosen = torch.full((size,), -1, dtype=torch.int64)  # (T,)
    for t in range(size):
        per_length = []
        for i, n in enumerate(lengths):
            seen = torch.zeros(vocab, dtype=torch.int64)  # (V,)
            if t >= n - 1:
                for p in range(n - 1, t):
                    if (p + 1) // capacity >= t // capacity - 1 and stream[p - n + 1:p + 1] == stream[t - n + 1:t + 1]:
                        seen[stream[p + 1]] += 1
            per_length.append(seen)
            totals[t, i] = seen.sum()
            if totals[t, i] > 0:
                chosen[t] = i
        if chosen[t] >= 0:
            counts[t] = per_length[int(chosen[t])]
    return counts, totals, chosen


def check_count_cache_device(device: torch.device | str) -> bool:
    """The cache on ``device`` gives the CPU's counts, totals and chosen lengths exactly: a batch of
    streams over 4 symbols (so contexts recur), fed in uneven pieces that cross two block ends and
    merge the small table several times. The ops are plain torch (sort, searchsorted, scatter);
    this checks them where they run in training."""
    gen = torch.Generator().manual_seed(0)
    lengths, vocab, capacity = (2, 3, 5, 8), 4, 3000
    tokens = torch.randint(0, vocab, (3, 7000), generator=gen)  # (B, T)
    results = []
    for where in ("cpu", device):
        tables = empty_tables(3, where)
        tail = torch.full((3, max(lengths)), -1, dtype=torch.int64, device=where)  # (B, span)
        pos, looks = 0, []
        for size in (1, 999, 2500, 1, 3499):
            look, tables, tail = count_cache_call(tables, tail, pos, tokens[:, pos:pos + size].to(where), lengths,
                                                  vocab, capacity, recent=500)
            looks.append(look)
            pos += size
        results.append([torch.cat(parts, dim=1).cpu() for parts in zip(*looks)])
    return all(torch.equal(a, b) for a, b in zip(*results))
