"""The retrieval external memory: one key/value entry per completed chunk, top-K read per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from horizonlm.ops.chunks import ChunkLayout, chunk_layout
from horizonlm.ops.memory_read import memory_read, visible_mask
from horizonlm.state import MemoryState, StoreMemoryState


class RetrievalMemory(nn.Module):
    """Each completed chunk writes ``k_c = normalize(W_k e_c)``, ``v_c = W_v e_c`` with
    ``e_c = norm(h_last)``; each token reads ``r_t`` over the top-K visible entries by
    ``q_t . k`` (``q_t = normalize(W_q norm(h_t))``), weights ``softmax(tau * score)``, and adds
    ``sigmoid(W_g norm(h_t)) * W_o r_t``.

    Entries written in this call keep their gradients (they take part in the same pass);
    entries in the returned state are detached, so gradients never cross windows. The returned
    memory keeps the newest ``capacity`` entries (FIFO eviction).
    """

    def __init__(self, d_model: int, dim: int, chunk_size: int, capacity: int, top_k: int, tau: float,
                 query_block: int, eps: float) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.capacity = capacity
        self.top_k = top_k
        self.tau = tau
        self.query_block = query_block
        self.norm = nn.RMSNorm(d_model, eps=eps)
        self.key = nn.Linear(d_model, dim, bias=False)
        self.value = nn.Linear(d_model, dim, bias=False)
        self.query = nn.Linear(d_model, dim, bias=False)
        self.gate = nn.Linear(d_model, d_model)
        self.out = nn.Linear(dim, d_model, bias=False)

    def init_state(self, batch_size: int, device: torch.device | None = None) -> MemoryState:
        weight = self.key.weight
        device = device or weight.device
        dim = weight.shape[0]
        empty = torch.zeros(batch_size, 0, dim, dtype=weight.dtype, device=device)  # (B, 0, Dk)
        ids = torch.zeros(0, dtype=torch.long, device=device)  # (0,)
        return MemoryState(keys=empty, values=empty.clone(), chunk_ids=ids, pos=0)

    def forward(self, h: Tensor, state: MemoryState | StoreMemoryState | None = None
                ) -> tuple[Tensor, MemoryState | StoreMemoryState]:
        if state is None:
            state = self.init_state(h.shape[0], h.device)
        if isinstance(state, StoreMemoryState):
            return self._forward_store(h, state)
        hn, layout, new_keys, new_values, queries = self.project(h, state.pos)
        if layout.ends.numel() > 0:
            keys = torch.cat([state.keys.to(new_keys.dtype), new_keys], dim=1)  # (B, M+m, Dk)
            values = torch.cat([state.values.to(new_values.dtype), new_values], dim=1)  # (B, M+m, Dv)
            ids = torch.cat([state.chunk_ids, layout.chunk_ids])  # (M+m,)
        else:  # no chunk ends here (most decode steps): the memory is read as it is, not copied
            keys, values, ids = state.keys, state.values, state.chunk_ids
        read = memory_read(queries, keys, values, ids, layout.completed_before, self.capacity, self.top_k,
                           self.tau, self.query_block)  # (B, L, Dv)
        keep = max(0, keys.shape[1] - self.capacity)
        new_state = MemoryState(keys=keys[:, keep:].detach(), values=values[:, keep:].detach(),
                                chunk_ids=ids[keep:], pos=state.pos + h.shape[1])
        return self._inject(h, hn, read), new_state

    def project(self, h: Tensor, pos: int) -> tuple[Tensor, ChunkLayout, Tensor, Tensor, Tensor]:
        """What both read paths compute from ``h``: the normed input, the chunk layout of this
        call, the entries of the chunks that end in it and every token's query.
        Returns hn (B, L, D), layout, keys (B, m, Dk), values (B, m, Dv), queries (B, L, Dk)."""
        layout = chunk_layout(pos, h.shape[1], self.chunk_size, h.device)
        hn = self.norm(h)  # (B, L, D)
        summaries = hn[:, layout.ends]  # (B, m, D)
        new_keys = F.normalize(self.key(summaries), dim=-1)  # (B, m, Dk)
        new_values = self.value(summaries)  # (B, m, Dv)
        queries = F.normalize(self.query(hn), dim=-1)  # (B, L, Dk)
        return hn, layout, new_keys, new_values, queries

    def _inject(self, h: Tensor, hn: Tensor, read: Tensor) -> Tensor:
        """The gated add ``h + sigmoid(W_g norm(h)) * W_o r``. read: (B, L, Dv) -> (B, L, D)."""
        return h + torch.sigmoid(self.gate(hn)) * self.out(read.to(hn.dtype))  # (B, L, D)

    def _forward_store(self, h: Tensor, state: StoreMemoryState) -> tuple[Tensor, StoreMemoryState]:
        """The same read over a :class:`MemoryStore`: the store is searched for ``K + m``
        candidates per token (m = chunks ending in this call, the most FIFO can evict meanwhile),
        candidates outside the token's window are masked, this call's own entries are scored
        exactly, and the best K of the union are read. The window is the store's capacity (an
        unlimited store keeps every entry visible: a saved context); with an exact FIFO store
        of the model's ``memory_capacity`` this equals the in-state path."""
        store = state.store
        if h.shape[0] != 1:
            raise ValueError(f"a store-backed memory serves batch_size=1, got {h.shape[0]}")
        if state.entries != store.first_id + len(store):
            raise ValueError("stale memory state: the store has grown since this state was made")
        hn, layout, new_keys, new_values, queries = self.project(h, state.pos)
        new_keys, new_values, queries = new_keys[0].float(), new_values[0].float(), queries[0].float()  # (m, Dk)
        window = store.config.capacity or 1 << 62
        reads = []
        for start in range(0, queries.shape[0], self.query_block):
            q = queries[start : start + self.query_block]  # (Lb, Dk)
            seen = layout.completed_before[start : start + self.query_block]  # (Lb,)
            reads.append(self._read_store_block(store, q, seen, layout.chunk_ids, new_keys, new_values, window))
        read = torch.cat(reads, dim=0)  # (L, Dv)
        store.add(new_keys, new_values, layout.chunk_ids)
        return self._inject(h, hn, read.unsqueeze(0)), StoreMemoryState(store=store, entries=store.first_id + len(store), pos=state.pos + h.shape[1])

    def _read_store_block(self, store, q: Tensor, seen: Tensor, new_ids: Tensor, new_keys: Tensor,
                          new_values: Tensor, window: int) -> Tensor:
        """Top-K read for a block of queries over store candidates and this call's entries."""
        m = new_keys.shape[0]
        stored = len(store)
        if stored > 0:
            scores_s, rows = store.search(q, self.top_k + m)  # (Lb, S)
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
