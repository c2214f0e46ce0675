"""Multi-resolution depthwise causal convolution with a rolling input buffer.

Resolution r convolves with kernel size k at dilation ``2**r``. Causality comes from left
padding only, and the padding *is* the buffer of the last ``P = (k-1)*2**(R-1)`` inputs, so a
call on a window continues exactly from the previous one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from horizonlm.ops.causal_conv import causal_depthwise_conv


def buffer_length(kernel_size: int, levels: int) -> int:
    """Inputs the widest resolution looks back over: ``(k-1) * 2**(R-1)``."""
    return (kernel_size - 1) * 2 ** (levels - 1)


def effective_kernel(weight: Tensor, mix: Tensor) -> Tensor:
    """The R dilated kernels folded into one dense causal kernel of ``P + 1`` taps.

    Tap ``P - (k-1-j)*2**r`` gets ``mix[r] * weight[r, :, j]`` (taps shared between resolutions
    add up), so one depthwise convolution computes the whole mixture. weight: (R, D, k) -> (D, P+1).
    """
    levels, channels, kernel_size = weight.shape
    pad = buffer_length(kernel_size, levels)
    back = kernel_size - 1 - torch.arange(kernel_size, device=weight.device)  # (k,): steps back of tap j
    dilation = torch.pow(2, torch.arange(levels, device=weight.device))  # (R,)
    taps = (pad - dilation.unsqueeze(1) * back).flatten()  # (R*k,); built on the device (CUDA-graph safe)
    values = (mix.view(levels, 1, 1) * weight).permute(1, 0, 2).reshape(channels, levels * kernel_size)  # (D, R*k)
    return weight.new_zeros(channels, pad + 1).index_add(1, taps, values)  # (D, P+1)


def multires_causal_conv(x: Tensor, buffer: Tensor, weight: Tensor, mix: Tensor) -> tuple[Tensor, Tensor]:
    """Sum over resolutions r of ``mix[r] * depthwise_conv(x, weight[r], dilation=2**r)``, computed
    as one depthwise convolution with the folded kernel (fused Triton kernels on the GPU, see
    :mod:`horizonlm.ops.causal_conv`).

    x: (B, L, D), buffer: (B, P, D) (the inputs before x, zeros at the stream start),
    weight: (R, D, k), mix: (R,). Returns y (B, L, D) and the new buffer (B, P, D): the last P rows
    of ``cat([buffer, x])``, copied out of x (a view would keep all of x alive in the state).
    """
    return folded_causal_conv(x, buffer, effective_kernel(weight, mix))  # (B, L, D), (B, P, D)


def folded_causal_conv(x: Tensor, buffer: Tensor, kernel: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`multires_causal_conv` with the kernel already folded (:func:`effective_kernel`,
    (D, P+1)): a layer that keeps the folded kernel between decode steps calls this."""
    pad = buffer.shape[1]
    length = x.shape[1]
    y = causal_depthwise_conv(x, buffer, kernel)  # (B, L, D)
    if length >= pad:
        new_buffer = x[:, length - pad :].clone()  # (B, P, D)
    else:
        new_buffer = torch.cat([buffer[:, length:], x], dim=1)  # (B, P, D)
    return y, new_buffer
