"""Causal self-attention with rotary positions and a key/value cache (the baseline's mixer).

Two cache forms: :meth:`CausalSelfAttention.forward` returns a cache grown by concatenation (the
immutable state of the model contract), :meth:`CausalSelfAttention.forward_static` writes into
preallocated buffers at a position held on the device, so a decode step has fixed shapes and no
host sync and can be replayed as a CUDA graph (the decode benchmark's like-for-like row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rotary(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotate channel pairs (i, i + Dh/2) by angle ``p * base**(-2i/Dh)`` (RoFormer, Su et al. 2021).

    x: (B, H, L, Dh); positions: (L,) stream positions of the L tokens (a tensor, so a graphed
    step can take them from the device).
    """
    head_dim = x.shape[-1]
    half = head_dim // 2
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    freqs = base ** (-torch.arange(half, device=x.device, dtype=compute) * 2 / head_dim)  # (Dh/2,)
    angles = positions.to(compute).unsqueeze(-1) * freqs  # (L, Dh/2)
    cos, sin = angles.cos(), angles.sin()  # (L, Dh/2)
    x1, x2 = x[..., :half].to(compute), x[..., half:].to(compute)  # (B, H, L, Dh/2)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, H, L, Dh)
    return rotated.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head attention by ``scaled_dot_product_attention``. The cache holds rotated keys."""

    def __init__(self, d_model: int, n_heads: int, rope_base: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.rope_base = rope_base
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def _rotated_qkv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.n_heads, width // self.n_heads)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, Dh)
        q = rotary(q, positions, self.rope_base)  # (B, H, L, Dh)
        k = rotary(k, positions, self.rope_base)  # (B, H, L, Dh)
        return q, k, v

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None, pos: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        batch, length, width = x.shape
        positions = torch.arange(pos, pos + length, device=x.device)  # (L,)
        q, k, v = self._rotated_qkv(x, positions)  # 3 x (B, H, L, Dh)
        if cache is not None and cache[0].shape[2] > 0:
            k = torch.cat([cache[0].to(k.dtype), k], dim=2)  # (B, H, T, Dh)
            v = torch.cat([cache[1].to(v.dtype), v], dim=2)  # (B, H, T, Dh)
        past = k.shape[2] - length
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, Dh)
        elif length == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, Dh)
        else:
            query_pos = torch.arange(past, past + length, device=x.device).unsqueeze(1)  # (L, 1)
            key_pos = torch.arange(past + length, device=x.device).unsqueeze(0)  # (1, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_pos <= query_pos)  # (B, H, L, Dh)
        y = y.transpose(1, 2).reshape(batch, length, width)  # (B, L, D)
        return self.out(y), (k, v)

    def forward_static(self, x: Tensor, keys: Tensor, values: Tensor, pos: Tensor) -> Tensor:
        """The L new tokens at stream positions ``pos .. pos+L-1`` (``pos`` a 0-d int64 tensor on
        the device), their rotated keys and values written into ``keys``/``values`` (B, H, T, Dh)
        in place. Attention runs over all T slots with the unwritten ones masked out: fixed shapes
        whatever the position, at the price of reading the whole capacity every step (a capacity
        close to the stream's length keeps that small). The caller keeps ``pos + L <= T``."""
        batch, length, width = x.shape
        positions = pos + torch.arange(length, device=x.device)  # (L,)
        q, k, v = self._rotated_qkv(x, positions)  # 3 x (B, H, L, Dh)
        keys.index_copy_(2, positions, k.to(keys.dtype))
        values.index_copy_(2, positions, v.to(values.dtype))
        slots = torch.arange(keys.shape[2], device=x.device)  # (T,)
        visible = slots.unsqueeze(0) <= positions.unsqueeze(1)  # (L, T)
        y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=visible)  # (B, H, L, Dh)
        y = y.transpose(1, 2).reshape(batch, length, width)  # (B, L, D)
        return self.out(y)  # (B, L, D)
