"""Multi-resolution depthwise causal convolution layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from horizonlm.layers.derived import Derived
from horizonlm.ops.dilated_conv import buffer_length, effective_kernel, folded_causal_conv


class MultiResConv(nn.Module):
    """Depthwise causal convolutions at dilations ``1, 2, ..., 2**(R-1)``, mixed by learned
    softmax weights, then GELU and an output projection. The state is the rolling buffer of the
    last ``(k-1)*2**(R-1)`` inputs (zeros at the stream start, exactly like left padding)."""

    def __init__(self, d_model: int, kernel_size: int, levels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(levels, d_model, kernel_size) / math.sqrt(kernel_size))  # (R, D, k)
        self.mix_logits = nn.Parameter(torch.zeros(levels))  # (R,)
        self.out = nn.Linear(d_model, d_model)
        self.buffer_length = buffer_length(kernel_size, levels)
        self.kept = Derived[Tensor]()  # the folded kernel, between calls without gradients

    def init_state(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        return self.weight.new_zeros(batch_size, self.buffer_length, self.weight.shape[1], device=device)  # (B, P, D)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if state is None:
            state = self.init_state(x.shape[0], x.device)
        kernel = self.kept((self.weight, self.mix_logits), (x.dtype, x.device), lambda: self.kernel(x.dtype))  # (D, P+1)
        y, new_state = folded_causal_conv(x, state.to(x.dtype), kernel)  # (B, L, D)
        return self.out(F.gelu(y)), new_state  # (B, L, D)

    def kernel(self, dtype: torch.dtype) -> Tensor:
        """The R dilated kernels and their softmax mix folded into one causal kernel (D, P+1)."""
        mix = torch.softmax(self.mix_logits, dim=0)  # (R,)
        return effective_kernel(self.weight.to(dtype), mix.to(dtype))  # (D, P+1)
