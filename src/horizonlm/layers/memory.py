"""The retrieval external memory: key/value entries per completed chunk (or per token), top-K read per token."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from horizonlm.ops.causal_conv import causal_depthwise_conv
from horizonlm.ops.chunks import ChunkLayout, chunk_layout
from horizonlm.ops.memory_read import memory_read, visible_mask
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
    """Pair mode: the key the next call's first entry takes. (B, 1, Dk)"""
    tail: Tensor | None
    """Key span n > 1: the last n-1 normed inputs, for the next call. (B, n-1, D)"""


class RetrievalMemory(nn.Module):
    """Each completed chunk writes ``k_c = normalize(W_k e_c)``, ``v_c = W_v e_c`` with
    ``e_c = norm(h_last)``; each token reads ``r_t`` over the top-K visible entries by
    ``q_t . k`` (``q_t = normalize(W_q norm(h_t))``), weights ``softmax(tau * score)``, and adds
    ``sigmoid(W_g norm(h_t)) * W_o r_t``.

    With ``write="token"`` every token writes ``k_t = normalize(W_k norm(h_t))``,
    ``v_t = W_v norm(h_t)``, tagged with the chunk it lies in, ``(pos + t) // C``. One vector per
    chunk cannot hold the many key/value pairs of a chunk; one per token lets the memory act as
    an associative store (multi-query associative recall, MQAR). With ``write="pair"`` token t's
    entry takes its key from the token before, ``k_t = normalize(W_k norm(h_{t-1}))`` (zeros at
    the stream start; the last key is carried in the state), and its value from t: the entry
    says what followed a context, and a query built from token t meets keys built from tokens of
    the same kind, as an induction head does; a token-mode memory must first learn that shift
    through W_k and W_q. With a key span ``n > 1`` keys and queries are made from
    ``c_t = sum_j w_j * norm(h_{t-j})``, j < n (a learned causal depthwise filter, which starts as
    the identity ``c_t = norm(h_t)``) instead of ``norm(h_t)``, so a key names a few tokens of local
    context; the last n-1 normed inputs are carried in the state. With ``tie_query`` queries use
    W_k (``q_t = normalize(W_k c_t)``): in pair mode a context seen before then scores exactly 1
    against the entry that followed it, at any distance, before any training (an exact n-gram
    match); untied, W_q must learn to meet W_k for each kind of context. Visibility is unchanged: a
    token reads the entries of the last ``capacity`` chunks completed strictly before it, so the
    entries of its own, incomplete chunk wait in the state, invisible, until that chunk completes.

    Entries written in this call keep their gradients (they take part in the same pass);
    entries in the returned state are detached, so gradients never cross windows. The returned
    memory keeps the entries of the newest ``capacity`` completed chunks (FIFO eviction) and, in
    token mode, those of the incomplete one.
    """

    def __init__(self, d_model: int, dim: int, chunk_size: int, capacity: int, top_k: int, tau: float,
                 query_block: int, eps: float, write: str = "chunk", key_span: int = 1,
                 tie_query: bool = False) -> None:
        super().__init__()
        self.write = write
        self.key_span = key_span
        self.chunk_size = chunk_size
        self.capacity = capacity
        self.top_k = top_k
        self.tau = tau
        self.query_block = query_block
        self.norm = nn.RMSNorm(d_model, eps=eps)
        self.key = nn.Linear(d_model, dim, bias=False)
        self.value = nn.Linear(d_model, dim, bias=False)
        # Tied (W_q = W_k): a query is the key its own context would make, so a repeated context
        # scores exactly 1 against the entry that followed it, with nothing to learn.
        self.query = None if tie_query else nn.Linear(d_model, dim, bias=False)
        self.gate = nn.Linear(d_model, d_model)
        self.out = nn.Linear(dim, d_model, bias=False)
        # w_j of the key span's filter, tap n-1 on token t (see causal_conv): the identity at first.
        self.span_filter = (nn.Parameter(F.one_hot(torch.full((d_model,), key_span - 1), key_span).float())
                            if key_span > 1 else None)  # (D, n)

    @property
    def entries_per_chunk(self) -> int:
        """Entries a completed chunk leaves in the memory: C when every token writes, else 1."""
        return 1 if self.write == "chunk" else self.chunk_size

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
        ``last_key`` (pair mode: the key of the first entry, which no token precedes) and
        ``tail`` (key span n > 1: the inputs before the start, as left padding), zeros where the
        memory has them, None where it does not. The in-state and the store-backed state share it."""
        weight = self.key.weight
        device = device or weight.device
        dim_key, dim_in = weight.shape
        last_key = (torch.zeros(batch_size, 1, dim_key, dtype=weight.dtype, device=device)  # (B, 1, Dk)
                    if self.write == "pair" else None)
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
                           self.tau, self.query_block)  # (B, L, Dv)
        keep = self._evicted(keys.shape[1], state.pos + h.shape[1])
        new_state = MemoryState(keys=keys[:, keep:].detach(), values=values[:, keep:].detach(),
                                chunk_ids=ids[keep:], pos=state.pos + h.shape[1], **self._carried(p))
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
        by the visibility rule) and, in token mode, the pending ones of the incomplete chunk.
        Entries are kept in stream order, so the kept ones are the positions from the first token
        of chunk ``end // C - M`` to ``end``; Python integers, so it never waits on the device."""
        if self.write == "chunk":
            return max(0, entries - self.capacity)  # one entry per completed chunk
        first = max(0, end // self.chunk_size - self.capacity) * self.chunk_size  # first position kept
        return max(0, entries - (end - first))

    def project(self, h: Tensor, pos: int, last_key: Tensor | None = None,
                tail: Tensor | None = None) -> Projection:
        """What both read paths compute from ``h``: the normed input, the chunk layout of this
        call, this call's entries with their chunk ids (chunk mode: one per chunk that ends in
        the call; token and pair mode: one per token, tagged with the chunk it lies in), every
        token's query, and what the next call needs: (pair mode) the key its first entry takes,
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
        if self.write == "chunk":
            keyed, valued = context[:, layout.ends], hn[:, layout.ends]  # (B, m, D) twice
            new_ids = layout.chunk_ids  # (m,)
        else:
            keyed, valued, new_ids = context, hn, layout.completed_before  # (B, L, D) twice, (L,): token t's chunk
        new_keys = F.normalize(self.key(keyed), dim=-1)  # (B, m, Dk)
        new_values = self.value(valued)  # (B, m, Dv)
        queries = F.normalize((self.key if self.query is None else self.query)(context), dim=-1)  # (B, L, Dk)
        if self.write == "pair":
            if last_key is None:
                raise ValueError("memory_write='pair' needs the last key of the call before (state.last_key)")
            new_keys, last_key = torch.cat([last_key.to(new_keys.dtype), new_keys[:, :-1]], dim=1), new_keys[:, -1:]
        return Projection(hn, layout, new_keys, new_values, new_ids, queries,
                          last_key if self.write == "pair" else None, new_tail)

    def _inject(self, h: Tensor, hn: Tensor, read: Tensor) -> Tensor:
        """The gated add ``h + sigmoid(W_g norm(h)) * W_o r``. read: (B, L, Dv) -> (B, L, D)."""
        return h + torch.sigmoid(self.gate(hn)) * self.out(read.to(hn.dtype))  # (B, L, D)

    def _forward_store(self, h: Tensor, state: StoreMemoryState) -> tuple[Tensor, StoreMemoryState]:
        """The same read over a :class:`MemoryStore`: the store is searched for ``K + hidden``
        candidates per token (``hidden`` bounds the stored entries a token of this call may not
        see: in chunk mode the m chunks ending in this call, the most FIFO can evict meanwhile; in
        token mode the ``pos % C`` entries of the pending chunk), candidates outside the token's
        window are masked, this call's own entries are scored exactly, and the best K of the union
        are read. The window is the store's capacity (an unlimited store keeps every entry visible:
        a saved context); with an exact FIFO store of the model's ``memory_capacity`` this equals
        the in-state path. In token mode a FIFO store would evict by tokens, not chunks, and could
        not equal it: token and pair mode take only stores that never evict (capacity 0 or
        keep_all). Pair mode carries its last key beside the store, in the state."""
        store = state.store
        if h.shape[0] != 1:
            raise ValueError(f"a store-backed memory serves batch_size=1, got {h.shape[0]}")
        if state.entries != store.first_id + len(store):
            raise ValueError("stale memory state: the store has grown since this state was made")
        if self.write != "chunk" and store.config.capacity and store.config.policy == "fifo":
            raise ValueError(f"memory_write={self.write!r} needs a memory store that never evicts (capacity 0 or "
                             f"policy keep_all), got a FIFO store of capacity {store.config.capacity}: it would "
                             "drop tokens, not whole chunks, and read other entries than the in-state memory")
        p = self.project(h, state.pos, state.last_key, state.tail)
        layout, new_ids = p.layout, p.ids
        new_keys, new_values, queries = p.keys[0].float(), p.values[0].float(), p.queries[0].float()  # (m, Dk)
        window = store.config.capacity or 1 << 62
        hidden = new_ids.numel() if self.write == "chunk" else state.pos % self.chunk_size
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
        top, pick = scores.topk(min(self.top_k, scores.shape[1]), dim=-1)  # (Lb, K)
        valid = torch.isfinite(top)  # (Lb, K)
        weights = torch.softmax((self.tau * top).masked_fill(~valid, -1e4), dim=-1) * valid  # (Lb, K)
        from_store = pick < n_store  # (Lb, K)
        new_part = new_values[(pick - n_store).clamp(min=0, max=max(m - 1, 0))] if m else None  # (Lb, K, Dv)
        if n_store:
            rows_picked = safe.gather(1, pick.clamp(max=n_store - 1))  # (Lb, K)
            store_part = store.values.to(q.device)[rows_picked]  # (Lb, K, Dv)
            picked = store_part if new_part is None else torch.where(from_store.unsqueeze(-1), store_part, new_part)
        else:
            picked = new_part if new_part is not None else q.new_zeros(q.shape[0], top.shape[1], new_values.shape[-1])
        return torch.einsum("lk,lkd->ld", weights, picked)  # (Lb, Dv)
