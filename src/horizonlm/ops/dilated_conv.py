"""Multi-resolution depthwise causal convolution with a rolling input buffer.

Resolution r convolves with kernel size k at dilation ``2**r``. Causality comes from left
padding only, and the padding *is* the buffer of the last ``P = (k-1)*2**(R-1)`` inputs, so a
call on a window continues exactly from the previous one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def buffer_length(kernel_size: int, levels: int) -> int:
    """Inputs the widest resolution looks back over: ``(k-1) * 2**(R-1)``."""
    return (kernel_size - 1) * 2 ** (levels - 1)


def multires_causal_conv(x: Tensor, buffer: Tensor, weight: Tensor, mix: Tensor) -> tuple[Tensor, Tensor]:
    """Sum over resolutions r of ``mix[r] * depthwise_conv(x, weight[r], dilation=2**r)``.

    x: (B, L, D), buffer: (B, P, D) (the inputs before x, zeros at the stream start),
    weight: (R, D, k), mix: (R,). Returns y (B, L, D) and the new buffer (B, P, D).
    """
    levels, channels, kernel_size = weight.shape
    pad = buffer.shape[1]
    length = x.shape[1]
    full = torch.cat([buffer, x], dim=1).transpose(1, 2)  # (B, D, P+L)
    y = None
    for r in range(levels):
        dilation = 2**r
        span = (kernel_size - 1) * dilation
        out = F.conv1d(full[..., pad - span :], weight[r].unsqueeze(1), groups=channels, dilation=dilation)  # (B, D, L)
        y = mix[r] * out if y is None else y + mix[r] * out  # (B, D, L)
    new_buffer = full[..., full.shape[-1] - pad :].transpose(1, 2)  # (B, P, D)
    assert y.shape[-1] == length
    return y.transpose(1, 2), new_buffer  # (B, L, D)
