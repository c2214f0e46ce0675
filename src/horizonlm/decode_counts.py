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

from horizonlm.ops.count_cache import (HASH_M1, HASH_P1, HASH_P2, PAD, CountLookup, CountTables,
                                       second_modulus)
from horizonlm.state import CountCacheState

__all__ = ["HostCounts"]


def _distinct(items: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Real items (PAD dropped) made ascending and distinct, equal ones' counts summed. (U,) twice"""
    real = items != PAD
    items, counts = items[real], counts[real]
    order = np.argsort(items, kind="stable")
    items, counts = items[order], counts[order]
    if items.size == 0:
        return items, counts
    starts = np.flatnonzero(np.r_[True, items[1:] != items[:-1]])
    return items[starts], np.add.reduceat(counts, starts)


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

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """All its pairs as one sorted table. (U,) twice"""
        new = [(key * self.vocab + token, count) for key, nexts in self.added.items() for token, count in nexts.items()]
        items = np.array([item for item, _ in new], dtype=np.int64)  # (m,)
        counts = np.array([count for _, count in new], dtype=np.int64)  # (m,)
        return _distinct(np.concatenate([self.items, items]), np.concatenate([self.counts, counts]))


class HostCounts:
    """The count cache of a batch of streams on the host, for a decoder: :meth:`step` gives the
    lookup of one token per stream, as :meth:`horizonlm.layers.count_cache.CountCache.lookup` would,
    and :meth:`state` the cache's state after it. Changed in place: the decoder's own working copy
    (the decoder hands out states, never this)."""

    def __init__(self, state: CountCacheState, lengths: tuple[int, ...], vocab: int, capacity: int) -> None:
        self.lengths, self.vocab, self.capacity = tuple(lengths), vocab, capacity
        self.m2 = second_modulus(vocab)
        self.span = max(self.lengths)
        t = {name: table.detach().cpu().numpy() for name, table in state.tables._asdict().items()}  # (B, U) each
        self.current = [_Block(*_distinct(np.concatenate([t["items"][b], t["recent_items"][b]]),
                                          np.concatenate([t["counts"][b], t["recent_counts"][b]])), vocab)
                        for b in range(state.tail.shape[0])]
        self.previous = [_Block(*_distinct(t["prev_items"][b], t["prev_counts"][b]), vocab)
                         for b in range(state.tail.shape[0])]
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
            width = max(items.size for items, _ in tables)
            items = torch.full((len(blocks), width), PAD, dtype=torch.int64)  # (B, U)
            counts = torch.zeros(len(blocks), width, dtype=torch.int64)  # (B, U)
            for b, (row_items, row_counts) in enumerate(tables):
                items[b, :row_items.size] = torch.from_numpy(row_items)
                counts[b, :row_counts.size] = torch.from_numpy(row_counts)
            return items.to(device), counts.to(device)

        items, counts = stacked(self.current)
        prev_items, prev_counts = stacked(self.previous)
        none = torch.zeros(len(self.tails), 0, dtype=torch.int64, device=device)  # (B, 0)
        tail = torch.tensor(self.tails, dtype=torch.int64, device=device)  # (B, span)
        return CountCacheState(CountTables(items, counts, none, none.clone(), prev_items, prev_counts), tail=tail,
                               pos=self.pos)
