"""The retrieval external memory: key/value entries per completed chunk (or per token), top-K read per token."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from horizonlm.ops.causal_conv import causal_depthwise_conv
from horizonlm.ops.chunks import ChunkLayout, chunk_layout
from horizonlm.ops.memory_read import count_tau, memory_read, read_weights, visible_mask
from horizonlm.ops.topk_read import visible_counts
from horizonlm.ops.topk_search import topk_newest_first
from horizonlm.state import MemoryState, StoreMemoryState


class Projection(NamedTuple):
    """What both read paths compute from a call's input (see :meth:`RetrievalMemory.project`)."""

    hn: Tensor
    """The normed input. (B, L, D)"""
    layout: ChunkLayout
    """Chunk positions of this call."""
    keys: Tensor
    """This call's entries' unit keys. (B, m, Dk)"""
    values: Tensor
    """This call's entries' values. (B, m, Dv)"""
    ids: Tensor
    """Each entry's chunk id. (m,)"""
    queries: Tensor
    """Every token's unit query. (B, L, Dk)"""
    last_key: Tensor | None
    """Induction: the key the next call's first entry takes. (B, 1, Dk)"""
    tail: Tensor | None
    """Key span n > 1: the last n-1 normed inputs, for the next call. (B, n-1, D)"""


class RetrievalMemory(nn.Module):
    """The induction memory (``kind="induction"``, the default) or the paper's chunk memory.

    Induction: with ``c_t = sum_j w_j * norm(h_{t-j})``, j < n (a learned causal depthwise filter
    over the key span, drawn at random so that from the first step a key names its n tokens in
    order, not one), every token t writes the entry ``k_t = normalize(W_k c_{t-1})`` (zeros at the
    stream start; the last key is carried in the state), ``v_t = W_v norm(h_t)``, tagged with the
    chunk it lies in, ``(pos + t) // C``: the entry says what followed a context. Token t queries
    with ``q_t = normalize(W_k c_t)``, the same W_k, so a context seen before (the same n tokens)
    scores exactly 1 against the entry written after it, at any distance, with nothing to learn
    (an n-gram induction lookup). The softmax over the top K holds a null entry of value zero and
    learned score ``s_0`` (:func:`read_weights`): a read that matches nothing well, or finds
    nothing visible (a stream's first chunk, a reset), fades to zero instead of averaging the
    nearest strangers, so an empty memory reads what an unmatched token reads in training.

    Chunk (``kind="chunk"``, the ablation): each completed chunk writes ``k_c = normalize(W_k e_c)``,
    ``v_c = W_v e_c`` with ``e_c = norm(h_last)``; each token reads with its own
    ``q_t = normalize(W_q norm(h_t))``, ``softmax(tau * score)`` over the top K, no null entry.

    Both add ``sigmoid(W_g norm(h_t)) * W_o r_t``. A token reads the entries of the last
    ``capacity`` chunks completed strictly before it, so the entries of its own, incomplete
    chunk wait in the state, invisible, until that chunk completes.

    Entries written in this call keep their gradients (they take part in the same pass);
    entries in the returned state are detached, so gradients never cross windows. The returned
    memory keeps the entries of the newest ``capacity`` completed chunks (FIFO eviction) and, for
    the induction memory, those of the incomplete one.
    """

    def __init__(self, d_model: int, dim: int, chunk_size: int, capacity: int, top_k: int, tau: float,
                 query_block: int, eps: float, kind: str = "induction", key_span: int = 1,
                 tau_growth: bool = False) -> None:
        super().__init__()
        if kind not in ("induction", "chunk"):
            raise ValueError(f"kind must be 'induction' or 'chunk', got {kind!r}")
        self.kind = kind
        self.key_span = key_span
        self.chunk_size = chunk_size
        self.capacity = capacity
        self.top_k = top_k
        self.tau = tau
        self.query_block = query_block
        self.norm = nn.RMSNorm(d_model, eps=eps)
        self.key = nn.Linear(d_model, dim, bias=False)
        self.value = nn.Linear(d_model, dim, bias=False)
        # Induction: W_q = W_k, a query is the key its own context would make, so a repeated
        # context scores exactly 1 against the entry that followed it, with nothing to learn.
        self.query = nn.Linear(d_model, dim, bias=False) if kind == "chunk" else None
        # s_0: the null entry's cosine score; exact matches (1) outweigh it by exp(tau / 2).
        self.null_score = nn.Parameter(torch.full((1,), 0.5)) if kind == "induction" else None  # (1,)
        # a in tau_t = tau (1 + a log n_t) (ops.memory_read.count_tau); 0: the read starts as with a fixed tau.
        self.tau_growth = nn.Parameter(torch.zeros(1)) if tau_growth else None  # (1,)
        self.gate = nn.Linear(d_model, d_model)
        self.out = nn.Linear(dim, d_model, bias=False)
        # w_j of the key span's filter, tap n-1 on token t (see causal_conv). Drawn at random rather
        # than as the identity, so that at initialisation a key already tells its n tokens apart.
        self.span_filter = (nn.Parameter(torch.randn(d_model, key_span) / key_span ** 0.5)
                            if key_span > 1 else None)  # (D, n)

    def read_scalars(self) -> dict[str, float | None]:
        """The read's learned scalars as numbers (tau, s_0, a), for results files: what a trained
        checkpoint's read does with a large memory depends on them."""
        return {"tau": self.tau,
                "null_score": None if self.null_score is None else self.null_score.item(),
                "tau_growth": None if self.tau_growth is None else self.tau_growth.item()}

    @property
    def entries_per_chunk(self) -> int:
        """Entries a completed chunk leaves in the memory: C when every token writes, else 1."""
        return 1 if self.kind == "chunk" else self.chunk_size

    def init_state(self, batch_size: int, device: torch.device | None = None) -> MemoryState:
        weight = self.key.weight
        device = device or weight.device
        dim = weight.shape[0]
        empty = torch.zeros(batch_size, 0, dim, dtype=weight.dtype, device=device)  # (B, 0, Dk)
        ids = torch.zeros(0, dtype=torch.long, device=device)  # (0,)
        return MemoryState(keys=empty, values=empty.clone(), chunk_ids=ids, pos=0,
                           **self.initial_carried(batch_size, device))

    def initial_carried(self, batch_size: int, device: torch.device | None = None) -> dict[str, Tensor | None]:
        """What a memory state carries besides its entries, at the stream start, by field name:
        ``last_key`` (induction: the key of the first entry, which no token precedes) and
        ``tail`` (key span n > 1: the inputs before the start, as left padding), zeros where the
        memory has them, None where it does not. The in-state and the store-backed state share it."""
        weight = self.key.weight
        device = device or weight.device
        dim_key, dim_in = weight.shape
        last_key = (torch.zeros(batch_size, 1, dim_key, dtype=weight.dtype, device=device)  # (B, 1, Dk)
                    if self.kind == "induction" else None)
        tail = (torch.zeros(batch_size, self.key_span - 1, dim_in, dtype=weight.dtype, device=device)  # (B, n-1, D)
                if self.span_filter is not None else None)
        return {"last_key": last_key, "tail": tail}

    def forward(self, h: Tensor, state: MemoryState | StoreMemoryState | None = None
                ) -> tuple[Tensor, MemoryState | StoreMemoryState]:
        if state is None:
            state = self.init_state(h.shape[0], h.device)
        if isinstance(state, StoreMemoryState):
            return self._forward_store(h, state)
        p = self.project(h, state.pos, state.last_key, state.tail)
        if p.ids.numel() > 0:
            keys = torch.cat([state.keys.to(p.keys.dtype), p.keys], dim=1)  # (B, M+m, Dk)
            values = torch.cat([state.values.to(p.values.dtype), p.values], dim=1)  # (B, M+m, Dv)
            ids = torch.cat([state.chunk_ids, p.ids])  # (M+m,)
        else:  # chunk mode, no chunk ends here (most decode steps): the memory is read as it is, not copied
            keys, values, ids = state.keys, state.values, state.chunk_ids
        read = memory_read(p.queries, keys, values, ids, p.layout.completed_before, self.capacity, self.top_k,
                           self.tau, self.query_block, self.null_score, tau_growth=self.tau_growth,
                           live_from=state.live_from)  # (B, L, Dv)
        keep = self._evicted(keys.shape[1], state.pos + h.shape[1])
        new_state = MemoryState(keys=keys[:, keep:].detach(), values=values[:, keep:].detach(),
                                chunk_ids=ids[keep:], pos=state.pos + h.shape[1], live_from=state.live_from,
                                **self._carried(p))
        return self._inject(h, p.hn, read), new_state

    @staticmethod
    def _carried(p: Projection) -> dict[str, Tensor | None]:
        """What the next call needs from this one besides the entries, detached (no gradient
        crosses windows)."""
        return {"last_key": None if p.last_key is None else p.last_key.detach(),
                "tail": None if p.tail is None else p.tail.detach()}

    def _evicted(self, entries: int, end: int) -> int:
        """How many of the oldest ``entries`` to drop after a call that ends at stream position
        ``end``: all but the entries a token of a later call can see (chunks ``>= end // C - M``,
        by the visibility rule) and, for the induction memory, the pending ones of the incomplete
        chunk. Entries are kept in stream order, so the kept ones are the newest: the visible
        chunks' entries (one or C each) plus the ``end % C`` pending ones. Python integers, so it
        never waits on the device."""
        completed = end // self.chunk_size
        visible = completed - max(0, completed - self.capacity)  # chunks a later token can see
        pending = end % self.chunk_size if self.kind == "induction" else 0
        return max(0, entries - (visible * self.entries_per_chunk + pending))

    def project(self, h: Tensor, pos: int, last_key: Tensor | None = None,
                tail: Tensor | None = None) -> Projection:
        """What both read paths compute from ``h``: the normed input, the chunk layout of this
        call, this call's entries with their chunk ids (chunk mode: one per chunk that ends in
        the call; induction: one per token, tagged with the chunk it lies in), every token's
        query, and what the next call needs: (induction) the key its first entry takes,
        (key span n > 1) the last n-1 normed inputs. ``last_key`` and ``tail`` are those from the
        call before."""
        layout = chunk_layout(pos, h.shape[1], self.chunk_size, h.device)
        hn = self.norm(h)  # (B, L, D)
        context, new_tail = hn, None
        if self.span_filter is not None:
            if tail is None:
                raise ValueError(f"memory_key_span={self.key_span} needs the inputs of the call before (state.tail)")
            tail = tail.to(hn.dtype)  # (B, n-1, D)
            context = causal_depthwise_conv(hn, tail, self.span_filter.to(hn.dtype))  # (B, L, D)
            # The last n-1 inputs: the tail's newest rows where this call is shorter than n-1.
            new_tail = torch.cat([tail[:, hn.shape[1]:], hn[:, -(self.key_span - 1):]], dim=1)  # (B, n-1, D)
        if self.kind == "chunk":
            keyed, valued = context[:, layout.ends], hn[:, layout.ends]  # (B, m, D) twice
            new_ids = layout.chunk_ids  # (m,)
        else:
            keyed, valued, new_ids = context, hn, layout.completed_before  # (B, L, D) twice, (L,): token t's chunk
        new_keys = F.normalize(self.key(keyed), dim=-1)  # (B, m, Dk)
        new_values = self.value(valued)  # (B, m, Dv)
        queries = F.normalize((self.key if self.query is None else self.query)(context), dim=-1)  # (B, L, Dk)
        if self.kind == "induction":
            if last_key is None:
                raise ValueError("the induction memory needs the last key of the call before (state.last_key)")
            new_keys, last_key = torch.cat([last_key.to(new_keys.dtype), new_keys[:, :-1]], dim=1), new_keys[:, -1:]
        return Projection(hn, layout, new_keys, new_values, new_ids, queries,
                          last_key if self.kind == "induction" else None, new_tail)

    def _inject(self, h: Tensor, hn: Tensor, read: Tensor) -> Tensor:
        """The gated add ``h + sigmoid(W_g norm(h)) * W_o r``. read: (B, L, Dv) -> (B, L, D)."""
        return h + torch.sigmoid(self.gate(hn)) * self.out(read.to(hn.dtype))  # (B, L, D)

    def _forward_store(self, h: Tensor, state: StoreMemoryState) -> tuple[Tensor, StoreMemoryState]:
        """The same read over a :class:`MemoryStore`: the store is searched for ``K + hidden``
        candidates per token (``hidden`` bounds the stored entries a token of this call may not
        see: in chunk mode the m chunks ending in this call, the most FIFO can evict meanwhile; in
        the induction memory the ``pos % C`` entries of the pending chunk), candidates outside the token's
        window are masked, this call's own entries are scored exactly, and the best K of the union
        are read. The window is the store's capacity (an unlimited store keeps every entry visible:
        a saved context); with an exact FIFO store of the model's ``memory_capacity`` this equals
        the in-state path. For the induction memory a FIFO store would evict by tokens, not chunks,
        and could not equal it: it takes only stores that never evict (capacity 0 or keep_all),
        and carries its last key beside the store, in the state."""
        store = state.store
        if h.shape[0] != 1:
            raise ValueError(f"a store-backed memory serves batch_size=1, got {h.shape[0]}")
        if state.entries != store.first_id + len(store):
            raise ValueError("stale memory state: the store has grown since this state was made")
        if self.kind != "chunk" and store.config.capacity and store.config.policy == "fifo":
            raise ValueError(f"the {self.kind} memory needs a memory store that never evicts (capacity 0 or "
                             f"policy keep_all), got a FIFO store of capacity {store.config.capacity}: it would "
                             "drop tokens, not whole chunks, and read other entries than the in-state memory")
        p = self.project(h, state.pos, state.last_key, state.tail)
        layout, new_ids = p.layout, p.ids
        new_keys, new_values, queries = p.keys[0].float(), p.values[0].float(), p.queries[0].float()  # (m, Dk)
        window = store.config.capacity or 1 << 62
        hidden = new_ids.numel() if self.kind == "chunk" else state.pos % self.chunk_size
        reads = []
        for start in range(0, queries.shape[0], self.query_block):
            q = queries[start : start + self.query_block]  # (Lb, Dk)
            seen = layout.completed_before[start : start + self.query_block]  # (Lb,)
            reads.append(self._read_store_block(store, q, seen, new_ids, new_keys, new_values, window, hidden))
        read = torch.cat(reads, dim=0)  # (L, Dv)
        store.add(new_keys, new_values, new_ids)
        new_state = StoreMemoryState(store=store, entries=store.first_id + len(store), pos=state.pos + h.shape[1],
                                     **self._carried(p))
        return self._inject(h, p.hn, read.unsqueeze(0)), new_state

    def _read_store_block(self, store, q: Tensor, seen: Tensor, new_ids: Tensor, new_keys: Tensor,
                          new_values: Tensor, window: int, hidden: int) -> Tensor:
        """Top-K read for a block of queries over ``K + hidden`` store candidates and this call's
        entries."""
        m = new_keys.shape[0]
        stored = len(store)
        if stored > 0:
            scores_s, rows = store.search(q, self.top_k + hidden)  # (Lb, S)
            scores_s, rows = scores_s.to(q.device), rows.to(q.device)
            safe = rows.clamp(min=0)  # (Lb, S)
            ids_s = store.positions.to(q.device)[safe]  # (Lb, S)
            vis_s = (rows >= 0) & (ids_s < seen.unsqueeze(1)) & (ids_s >= seen.unsqueeze(1) - window)  # (Lb, S)
            scores_s = scores_s.masked_fill(~vis_s, float("-inf"))  # (Lb, S)
        else:
            scores_s = q.new_zeros(q.shape[0], 0)  # (Lb, 0)
            safe = torch.zeros(q.shape[0], 0, dtype=torch.long, device=q.device)  # (Lb, 0)
        n_store = scores_s.shape[1]
        scores_n = (q @ new_keys.T).masked_fill(~visible_mask(new_ids, seen, window), float("-inf"))  # (Lb, m)
        scores = torch.cat([scores_s, scores_n], dim=1)  # (Lb, S+m)
        ages = torch.cat([safe, stored + torch.arange(m, device=q.device).expand(q.shape[0], m)], dim=1)  # (Lb, S+m)
        top, pick = topk_newest_first(scores, min(self.top_k, scores.shape[1]), ages)  # (Lb, K)
        counts = None
        if self.tau_growth is not None:  # entries visible in the store and among this call's
            positions = store.positions.to(q.device)  # (stored,)
            counts = visible_counts(positions, seen, window) + visible_counts(new_ids, seen, window)  # (Lb,)
        weights = read_weights(top, count_tau(self.tau, self.tau_growth, counts), self.null_score)  # (Lb, K)
        from_store = pick < n_store  # (Lb, K)
        new_part = new_values[(pick - n_store).clamp(min=0, max=max(m - 1, 0))] if m else None  # (Lb, K, Dv)
        if n_store:
            rows_picked = safe.gather(1, pick.clamp(max=n_store - 1))  # (Lb, K)
            store_part = store.values.to(q.device)[rows_picked]  # (Lb, K, Dv)
            picked = store_part if new_part is None else torch.where(from_store.unsqueeze(-1), store_part, new_part)
        else:
            picked = new_part if new_part is not None else q.new_zeros(q.shape[0], top.shape[1], new_values.shape[-1])
        return torch.einsum("lk,lkd->ld", weights, picked)  # (Lb, Dv)


class LateRead(nn.Module):
    """``h + sigmoid(W_g' norm(h)) * W_o' m``: ``m``, what the induction memory added to the
    residual stream where it reads, added again just before the final norm, with a gate of its
    own. A read made at the token embeddings reaches the logits otherwise only through every
    block; this path is one product from the read to the head. W_o' starts at zero (the model
    zeroes it after its weight init), so a model starts as it would without it.
    h, m: (B, L, D). Returns (B, L, D)."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=eps)
        self.gate = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, h: Tensor, added: Tensor) -> Tensor:
        return h + torch.sigmoid(self.gate(self.norm(h))) * self.out(added)  # (B, L, D)


@contextlib.contextmanager
def reads_dropped(memory: nn.Module, rows: Tensor | None = None) -> Iterator[None]:
    """Within this context the memory's gated add is left out, for the streams where ``rows``
    (B, 1, 1) is true or for all of them (None); the memory still writes and its state grows.
    Training uses it to show a model what an empty memory reads, ``horizon passkey`` to ask a
    model without its read."""

    def hook(module: nn.Module, args: tuple, output: tuple) -> tuple:
        return (args[0] if rows is None else torch.where(rows, args[0], output[0]), output[1])

    handle = memory.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
