"""The recurrent supervisor: a GRU over completed-chunk summaries, fed back by a gated add."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from horizonlm.ops.chunks import chunk_layout
from horizonlm.state import SupervisorState


class RecurrentSupervisor(nn.Module):
    """When chunk c completes, ``e_c = W_e norm(h_last)`` (the last token has seen the whole chunk)
    updates ``s_c = GRU(e_c, s_{c-1})``; each token of chunk c+1 gets
    ``h_t += sigmoid(W_g norm(h_t)) * W_s s_c``. Tokens of chunk 0 get the initial state (zeros).

    A token never sees its own chunk through this path: the state it receives was built from
    chunks that ended strictly before it. No partial chunk is stored: the summary is one token's
    hidden state, so the S4D and convolution states already carry the chunk so far.
    """

    def __init__(self, d_model: int, dim: int, chunk_size: int, eps: float) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.norm = nn.RMSNorm(d_model, eps=eps)
        self.summary = nn.Linear(d_model, dim)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.gate = nn.Linear(d_model, d_model)
        self.inject = nn.Linear(dim, d_model, bias=False)

    def init_state(self, batch_size: int, device: torch.device | None = None) -> SupervisorState:
        weight = self.summary.weight
        s = torch.zeros(batch_size, self.gru.hidden_size, dtype=weight.dtype, device=device or weight.device)  # (B, S)
        return SupervisorState(s=s, pos=0)

    def forward(self, h: Tensor, state: SupervisorState | None = None) -> tuple[Tensor, SupervisorState]:
        if state is None:
            state = self.init_state(h.shape[0], h.device)
        layout = chunk_layout(state.pos, h.shape[1], self.chunk_size, h.device)
        hn = self.norm(h)  # (B, L, D)
        s0 = state.s  # (B, S)
        if layout.ends.numel() > 0:
            e = self.summary(hn[:, layout.ends])  # (B, m, S)
            out, s_last = self.gru(e.to(s0.dtype), s0.unsqueeze(0).contiguous())  # (B, m, S), (1, B, S)
            states = torch.cat([s0.unsqueeze(1), out], dim=1)  # (B, m+1, S)
            s_new = s_last.squeeze(0)  # (B, S)
        else:
            states = s0.unsqueeze(1)  # (B, 1, S)
            s_new = s0
        received = states[:, layout.completed_in_call_before]  # (B, L, S)
        update = torch.sigmoid(self.gate(hn)) * self.inject(received.to(hn.dtype))  # (B, L, D)
        return h + update, SupervisorState(s=s_new, pos=state.pos + h.shape[1])
