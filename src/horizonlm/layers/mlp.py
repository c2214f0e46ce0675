"""Gated linear unit MLP shared by HorizonLM and the transformer baseline."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class GLUMLP(nn.Module):
    """SwiGLU (Shazeer, 2020): ``W_2 (silu(W_1 x) * W_3 x)``. Position-wise, so it needs no state."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))  # (B, L, D)
