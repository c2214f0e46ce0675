"""The count cache while decoding: each stream's pairs on the host, moved on a token at a time.

A decoding step is a call of one token, where the batched path (:func:`horizonlm.ops.count_cache.count_cache_call`)
still runs a few hundred small tensor operations, each launched on its own on a GPU (a decode step
with them took 4-6 times the default's on an H100, RESULTS.md 1.2f) or dispatched on its own on a CPU. Here the tables the
decoder starts from stay as sorted arrays, searched as there (a context's pairs are one run of
items ``key * V + next``), and the pairs of the tokens decoded since go into dictionaries; a step
is a hash per context length and a few lookups. The counts are the batched path's, exactly
(``tests/test_decode_counts.py`` holds them to :func:`~horizonlm.ops.count_cache.count_reference`
and to the batched path, token by token, across block ends).
"""

from __future__ import annotations

import numpy as np
import torch

from horizonlm.ops.count_cache import (HASH_M1, HASH_P1, HASH_P2, PAD, CountLookup, CountTables, merge_counts,
                                       second_modulus)
from horizonlm.state import CountCacheState

__all__ = ["HostCounts"]


def _rows(items: torch.Tensor, counts: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each row of a table (B, U) twice, ascending and PAD-filled, as its real items and counts. (U_b,) twice a row"""
    real = (items != PAD).sum(dim=1).tolist()
    return [(items[b, :n].numpy(), counts[b, :n].numpy()) for b, n in enumerate(real)]


class _Block:
    """One block's pairs of one stream: a sorted table from the decoder's start and the pairs added since."""

    def __init__(self, items: np.ndarray, counts: np.ndarray, vocab: int) -> None:
        self.vocab = vocab
        self.items, self.counts = items, counts  # (U,) int64 twice, ascending and distinct
        self.prefix = np.concatenate([[0], np.cumsum(counts)])  # (U + 1,)
        self.added: dict[int, dict[int, int]] = {}  # key -> {next token: count}
        self.added_totals: dict[int, int] = {}  # key -> its count over every next token

    @classmethod
    def empty(cls, vocab: int) -> _Block:
        none = np.zeros(0, dtype=np.int64)  # (0,)
        return cls(none, none.copy(), vocab)

    def add(self, key: int, token: int) -> None:
        nexts = self.added.setdefault(key, {})
        nexts[token] = nexts.get(token, 0) + 1
        self.added_totals[key] = self.added_totals.get(key, 0) + 1

    def runs(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each key's run [lo, hi) in the sorted table. (n,) twice"""
        return (np.searchsorted(self.items, keys * self.vocab),
                np.searchsorted(self.items, keys * self.vocab + self.vocab))

    def totals(self, keys: list[int]) -> np.ndarray:
        """How often each context was followed by any token. (n,)"""
        lo, hi = self.runs(np.asarray(keys, dtype=np.int64))  # (n,) twice
        return self.prefix[hi] - self.prefix[lo] + np.array([self.added_totals.get(k, 0) for k in keys], dtype=np.int64)

    def add_counts(self, key: int, out: np.ndarray) -> None:
        """Add to ``out`` (V,) how often each token followed the context ``key``."""
        lo, hi = self.runs(np.array([key], dtype=np.int64))
        run = slice(int(lo[0]), int(hi[0]))
        np.add.at(out, self.items[run] - key * self.vocab, self.counts[run])
        for token, count in self.added.get(key, {}).items():
            out[token] += count

    def table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All its pairs as one sorted table (:func:`~horizonlm.ops.count_cache.merge_counts`). (U,) twice"""
        new = [(key * self.vocab + token, count) for key, nexts in self.added.items() for token, count in nexts.items()]
        items = torch.tensor([item for item, _ in new], dtype=torch.int64).view(1, -1)  # (1, m)
        counts = torch.tensor([count for _, count in new], dtype=torch.int64).view(1, -1)  # (1, m)
        merged, merged_counts = merge_counts(torch.from_numpy(self.items)[None], torch.from_numpy(self.counts)[None],
                                             items, counts)  # (1, U) twice
        return merged[0], merged_counts[0]


class HostCounts:
    """The count cache of a batch of streams on the host, for a decoder: :meth:`step` gives the
    lookup of one token per stream, as :meth:`horizonlm.layers.count_cache.CountCache.lookup` would,
    and :meth:`state` the cache's state after it. Changed in place: the decoder's own working copy
    (the decoder hands out states, never this)."""

    def __init__(self, state: CountCacheState, lengths: tuple[int, ...], vocab: int, capacity: int) -> None:
        self.lengths, self.vocab, self.capacity = tuple(lengths), vocab, capacity
        self.m2 = second_modulus(vocab)
        self.span = max(self.lengths)
        t = CountTables(*(table.detach().cpu() for table in state.tables))  # (B, U) each
        current = merge_counts(t.items, t.counts, t.recent_items, t.recent_counts)  # (B, U) twice: the block's pairs
        self.current = [_Block(items, counts, vocab) for items, counts in _rows(*current)]
        self.previous = [_Block(items, counts, vocab) for items, counts in _rows(t.prev_items, t.prev_counts)]
        self.tails = [list(row) for row in state.tail.detach().cpu().tolist()]  # oldest first, -1 before the start
        self.pos = state.pos
        self.keys = [self._keys(tail) for tail in self.tails]  # each stream's contexts ending at its last token

    def _keys(self, tail: list[int]) -> list[int]:
        """The hashed context of each length ending at the tail's last token, -1 where it reaches a
        -1: :func:`horizonlm.ops.count_cache.context_keys` for one position, by Horner's rule."""
        h1 = h2 = 0
        valid = True
        keys = []
        for back, token in enumerate(reversed(tail[-self.span:])):
            valid = valid and token >= 0
            h1 = (h1 * HASH_P1 + token + 2) % HASH_M1
            h2 = (h2 * HASH_P2 + token + 2) % self.m2
            if back + 1 in self.lengths:
                keys.append(h1 * self.m2 + h2 if valid else -1)
        return keys

    def step(self, tokens: list[int]) -> CountLookup:
        """One token per stream: its pairs counted, then the lookup of the context it ends. CPU
        tensors (B, 1, V) int32, (B, 1, n) int64, (B, 1) int64."""
        if len(tokens) != len(self.tails):
            raise ValueError(f"expected {len(self.tails)} tokens, one per stream, got {len(tokens)}")
        if self.pos % self.capacity == 0 and self.pos > 0:  # a block begins: the current one becomes the previous
            self.previous = self.current
            self.current = [_Block.empty(self.vocab) for _ in tokens]
        batch, n_len = len(tokens), len(self.lengths)
        counts = np.zeros((batch, 1, self.vocab), dtype=np.int64)  # (B, 1, V)
        totals = np.zeros((batch, 1, n_len), dtype=np.int64)  # (B, 1, n)
        chosen = np.full((batch, 1), -1, dtype=np.int64)  # (B, 1)
        for b, token in enumerate(tokens):
            for key in self.keys[b]:
                if key >= 0:
                    self.current[b].add(key, token)
            self.tails[b] = self.tails[b][1:] + [token]
            query = self._keys(self.tails[b])
            self.keys[b] = query
            seen = self.current[b].totals(query) + self.previous[b].totals(query)  # (n,)
            seen[np.asarray(query) < 0] = 0
            totals[b, 0] = seen
            hits = np.flatnonzero(seen > 0)
            if hits.size:
                chosen[b, 0] = hits[-1]
                for block in (self.current[b], self.previous[b]):
                    block.add_counts(query[hits[-1]], counts[b, 0])
        self.pos += 1
        return CountLookup(counts=torch.from_numpy(counts).to(torch.int32), totals=torch.from_numpy(totals),
                           chosen=torch.from_numpy(chosen))

    def state(self, device: torch.device | str | None = None) -> CountCacheState:
        """The cache's state now, on ``device``: each stream's current block in the large table
        (the small one empty) and the block before, rows PAD-filled to one width."""

        def stacked(blocks: list[_Block]) -> tuple[torch.Tensor, torch.Tensor]:
            tables = [block.table() for block in blocks]
            width = max(row_items.numel() for row_items, _ in tables)
            items = torch.full((len(blocks), width), PAD, dtype=torch.int64)  # (B, U)
            counts = torch.zeros(len(blocks), width, dtype=torch.int64)  # (B, U)
            for b, (row_items, row_counts) in enumerate(tables):
                items[b, :row_items.numel()] = row_items
                counts[b, :row_counts.numel()] = row_counts
            return items.to(device), counts.to(device)

        items, counts = stacked(self.current)
        prev_items, prev_counts = stacked(self.previous)
        none = torch.zeros(len(self.tails), 0, dtype=torch.int64, device=device)  # (B, 0)
        tail = torch.tensor(self.tails, dtype=torch.int64, device=device)  # (B, span)
        return CountCacheState(CountTables(items, counts, none, none.clone(), prev_items, prev_counts), tail=tail,
                               pos=self.pos)
