"""State objects of the one contract ``forward(x, state=None) -> (y, new_state)``.

States are immutable: a forward pass returns a new one and never changes the one it was given,
so a caller can branch a stream (for example, try two continuations) by reusing a state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from horizonlm.ops.count_cache import PAD, CountTables


@dataclass(frozen=True)
class BlockState:
    """One block's recurrent state."""

    ssm: Tensor | None
    """SSM state, real: S4D (B, D, N/2, 2) as (Re, Im) of its modes; selective (B, H, P, N)."""
    conv: Tensor | None
    """Last P inputs of the multi-resolution convolution. (B, P, D)"""


@dataclass(frozen=True)
class SupervisorState:
    """Recurrent supervisor state after every chunk completed so far."""

    s: Tensor
    """GRU state s_c. (B, S)"""
    pos: int
    """Tokens of the stream seen so far."""


@dataclass(frozen=True)
class MemoryState:
    """The retrieval memory: the entries of the most recent ``capacity`` completed chunks, oldest
    first (one per chunk for the chunk memory; for the induction memory one per token, plus the
    tokens of the incomplete chunk so far, invisible until it completes)."""

    keys: Tensor
    """Unit-norm keys k_c. (B, M, Dk)"""
    values: Tensor
    """Values v_c. (B, M, Dv)"""
    chunk_ids: Tensor
    """Stream-wide chunk index of each entry (its position in the stream), ascending. (M,) int64"""
    pos: int
    """Tokens of the stream seen so far."""
    last_key: Tensor | None = None
    """The induction memory: the key made from the last token seen, which the next token's
    entry takes (zeros at the stream start); None otherwise. (B, 1, Dk)"""
    tail: Tensor | None = None
    """``memory_key_span`` n > 1: the memory's last n-1 normed inputs, which the next call's
    keys and queries see (zeros at the stream start); None otherwise. (B, n-1, D)"""
    live_from: Tensor | None = None
    """Per stream, the first chunk id whose entries are its own: a stream restarted cold
    (:meth:`HorizonState.reset_streams`) keeps its old entries, zeroed, until they leave the
    window, and they do not count among the entries it sees (the read's grown tau); None: every
    entry is. (B,) int64"""


@dataclass(frozen=True)
class StoreMemoryState:
    """The retrieval memory kept in a :class:`horizonlm.memory.store.MemoryStore` (batch 1).

    A store can hold tens of millions of entries, so it is appended to in place rather than
    copied: a state made before the store grew is stale and is refused (``entries`` checks it).
    """

    store: Any
    """The MemoryStore (append-only)."""
    entries: int
    """Entries ever added to the store when this state was made."""
    pos: int
    """Tokens of the stream seen so far."""
    last_key: Tensor | None = None
    """The induction memory: the key the next entry takes, made from the last token read
    (zeros at the stream start); None otherwise. (1, 1, Dk)"""
    tail: Tensor | None = None
    """``memory_key_span`` n > 1: the last n-1 normed inputs (see MemoryState.tail). (1, n-1, D)"""


@dataclass(frozen=True)
class CountCacheState:
    """The count cache (:mod:`horizonlm.ops.count_cache`): the (context, next token) pairs of the
    current block of the stream and of the block before, counted."""

    tables: CountTables
    """The counted pairs, each table (B, U) int64 per field."""
    tail: Tensor
    """The last max(count_lengths) tokens, -1 before the stream start. (B, n) int64"""
    pos: int
    """Tokens of the stream seen so far."""

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> CountCacheState:
        return replace(self, tables=CountTables(*(fn(t) for t in self.tables)), tail=fn(self.tail))

    def forget(self, fresh: Tensor) -> CountCacheState:
        """The streams where ``fresh`` (B,) is true with no pairs and no tail, as at a stream start."""
        gone = fresh.to(self.tail.device).view(-1, 1)  # (B, 1)
        emptied = {name: torch.where(gone, PAD if name.endswith("items") else 0, t)
                   for name, t in self.tables._asdict().items()}  # (B, U) each
        return replace(self, tables=CountTables(**emptied), tail=torch.where(gone, -1, self.tail))


@dataclass(frozen=True)
class HorizonState:
    """Everything HorizonLM carries from one call to the next."""

    pos: int
    """Tokens of the stream seen so far; chunk boundaries are counted from 0."""
    blocks: tuple[BlockState, ...]
    """Per-block S4D state and convolution buffer."""
    supervisor: SupervisorState | None
    """None when the supervisor is switched off."""
    memory: MemoryState | StoreMemoryState | None
    """None when the memory is switched off."""
    batch_size: int
    """B: streams carried side by side."""
    counts: CountCacheState | None = None
    """None without the count cache (``count_lengths`` empty)."""

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> HorizonState:
        """The same state with ``fn`` applied to each of its tensors (a memory store, which is
        not a tensor, is kept as it is; a store-backed state's last key and tail are mapped)."""
        blocks = tuple(BlockState(*(None if t is None else fn(t) for t in (b.ssm, b.conv))) for b in self.blocks)
        sup = None if self.supervisor is None else replace(self.supervisor, s=fn(self.supervisor.s))
        mem = self.memory
        if isinstance(mem, MemoryState):
            mem = replace(mem, keys=fn(mem.keys), values=fn(mem.values), chunk_ids=fn(mem.chunk_ids),
                          live_from=None if mem.live_from is None else fn(mem.live_from))
        if mem is not None:
            mem = replace(mem, last_key=None if mem.last_key is None else fn(mem.last_key),
                          tail=None if mem.tail is None else fn(mem.tail))
        counts = None if self.counts is None else self.counts.map_tensors(fn)
        return replace(self, blocks=blocks, supervisor=sup, memory=mem, counts=counts)

    def detach(self) -> HorizonState:
        """Cut the autograd graph (truncated backprop through time between windows)."""
        return self.map_tensors(Tensor.detach)

    def reset_streams(self, fresh: Tensor) -> HorizonState:
        """The state with the streams where ``fresh`` (B,) is true zeroed, as at a stream's start:
        SSM states, convolution buffers, supervisor state, the memory's carried key and tail, and
        its entries (zero values add nothing to a read; zero keys score 0, below the null entry),
        which no longer count as entries it sees (``live_from`` moves past them), and the count
        cache's pairs and tail. The chunk clock is shared by the batch and keeps running."""
        if isinstance(self.memory, StoreMemoryState):
            raise ValueError("a state whose memory lives in a store holds one stream; start a new state instead")
        keep = (~fresh).to(torch.float32)  # (B,)

        def zero(t: Tensor) -> Tensor:
            if t.dtype == torch.int64:  # chunk ids: shared by the batch; live_from is set below
                return t
            return t * keep.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))  # (B, ...)

        state = self.map_tensors(zero)
        if state.counts is not None:
            state = replace(state, counts=state.counts.forget(fresh))
        mem = state.memory
        if mem is None:
            return state
        ids = mem.chunk_ids
        # past every entry held, an unfinished chunk's included (exact where a reset falls on a chunk
        # boundary, as in training; after a reset inside a chunk, that chunk's new entries are not counted either)
        newest = ids[-1] + 1 if ids.numel() else ids.new_zeros(())  # ()
        old = ids.new_zeros(fresh.shape[0]) if mem.live_from is None else mem.live_from  # (B,)
        live_from = torch.where(fresh.to(ids.device), newest, old)  # (B,)
        return replace(state, memory=replace(mem, live_from=live_from))

    def expand(self, batch_size: int) -> HorizonState:
        """A batch-1 state repeated ``batch_size`` times (many continuations of one context)."""
        if self.batch_size != 1:
            raise ValueError(f"expand needs a state of batch_size=1, got {self.batch_size}")
        if isinstance(self.memory, StoreMemoryState):
            raise ValueError("a state whose memory lives in a store cannot be expanded to a batch")

        def rep(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.expand(batch_size, *t.shape[1:]).contiguous()

        blocks = tuple(BlockState(rep(b.ssm), rep(b.conv)) for b in self.blocks)
        sup = None if self.supervisor is None else replace(self.supervisor, s=rep(self.supervisor.s))
        mem = None if self.memory is None else replace(self.memory, keys=rep(self.memory.keys),
                                                        values=rep(self.memory.values),
                                                        last_key=rep(self.memory.last_key),
                                                        tail=rep(self.memory.tail),
                                                        live_from=rep(self.memory.live_from))
        counts = None if self.counts is None else self.counts.map_tensors(rep)
        return replace(self, blocks=blocks, supervisor=sup, memory=mem, batch_size=batch_size, counts=counts)

    def to(self, device: torch.device | str) -> HorizonState:
        return self.map_tensors(lambda t: t.to(device))

    def clone(self) -> HorizonState:
        """A copy that shares no tensor storage with this state."""
        return self.map_tensors(Tensor.clone)


@dataclass(frozen=True)
class KVState:
    """The transformer baseline's key/value cache."""

    keys: tuple[Tensor, ...]
    """Per layer, rotated keys of every past token. (B, H, T, Dh)"""
    values: tuple[Tensor, ...]
    """Per layer, values of every past token. (B, H, T, Dh)"""
    pos: int
    """Tokens of the stream seen so far (T)."""
    batch_size: int
    """B: streams carried side by side."""

    def detach(self) -> KVState:
        return replace(self, keys=tuple(k.detach() for k in self.keys), values=tuple(v.detach() for v in self.values))

    def expand(self, batch_size: int) -> KVState:
        """A batch-1 cache repeated ``batch_size`` times."""
        if self.batch_size != 1:
            raise ValueError(f"expand needs a state of batch_size=1, got {self.batch_size}")
        keys = tuple(k.expand(batch_size, *k.shape[1:]).contiguous() for k in self.keys)
        values = tuple(v.expand(batch_size, *v.shape[1:]).contiguous() for v in self.values)
        return replace(self, keys=keys, values=values, batch_size=batch_size)

    def to(self, device: torch.device | str) -> KVState:
        return replace(self, keys=tuple(k.to(device) for k in self.keys), values=tuple(v.to(device) for v in self.values))
