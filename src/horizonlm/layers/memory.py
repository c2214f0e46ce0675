"""The retrieval external memory: one key/value entry per completed chunk, top-K read per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from horizonlm.ops.chunks import chunk_layout
from horizonlm.ops.memory_read import memory_read
from horizonlm.state import MemoryState


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

    def forward(self, h: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        if state is None:
            state = self.init_state(h.shape[0], h.device)
        layout = chunk_layout(state.pos, h.shape[1], self.chunk_size, h.device)
        hn = self.norm(h)  # (B, L, D)
        if layout.ends.numel() > 0:
            summaries = hn[:, layout.ends]  # (B, m, D)
            new_keys = F.normalize(self.key(summaries), dim=-1)  # (B, m, Dk)
            new_values = self.value(summaries)  # (B, m, Dv)
            keys = torch.cat([state.keys.to(new_keys.dtype), new_keys], dim=1)  # (B, M+m, Dk)
            values = torch.cat([state.values.to(new_values.dtype), new_values], dim=1)  # (B, M+m, Dv)
            ids = torch.cat([state.chunk_ids, layout.chunk_ids])  # (M+m,)
        else:  # no chunk ends here (most decode steps): the memory is read as it is, not copied
            keys, values, ids = state.keys, state.values, state.chunk_ids
        queries = F.normalize(self.query(hn), dim=-1)  # (B, L, Dk)
        read = memory_read(queries, keys, values, ids, layout.completed_before, self.capacity, self.top_k,
                           self.tau, self.query_block)  # (B, L, Dv)
        update = torch.sigmoid(self.gate(hn)) * self.out(read.to(hn.dtype))  # (B, L, D)
        keep = max(0, keys.shape[1] - self.capacity)
        new_state = MemoryState(keys=keys[:, keep:].detach(), values=values[:, keep:].detach(),
                                chunk_ids=ids[keep:], pos=state.pos + h.shape[1])
        return h + update, new_state
