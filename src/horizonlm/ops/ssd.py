"""Selective scan with a scalar decay per head: the SSD form of Mamba-2 (Dao and Gu, 2024,
"Transformers are SSMs"), with one group of B, C shared by all heads.

Per head h (P channels, state size N) and token t, with ``dt_t > 0`` and ``A_h < 0``:
``a_t = exp(dt_t*A_h)``, ``S_t = a_t*S_{t-1} + dt_t * x_t B_t^T`` (S is (P, N)) and
``y_t = S_t C_t``. Unrolled from an incoming state S_0 (log decays ``l_t = dt_t*A_h``,
``cs_t = l_1 + ... + l_t``)::

    y_t = sum_{s<=t} exp(cs_t - cs_s) (C_t . B_s) dt_s x_s  +  exp(cs_t) S_0 C_t

``ssd_chunked`` evaluates this in chunks of T tokens, all in real matrix products: inside a
chunk, the (T, T) causal matrix ``(C B^T) o exp(cs_t - cs_s)`` times ``dt x``; each chunk's own
contribution to the state at its end, ``sum_s exp(cs_T - cs_s) dt_s x_s B_s^T``; the states
entering the chunks, from the (W+1, W+1) matrix of decays between chunk boundaries (small, as the
decay is one scalar per head and chunk); and the incoming-state term ``exp(cs_t) S_in C_t``.
``ssd_step`` is the recurrence for one token; ``reference.ssd_recurrence_ref`` the loop.

Precision: every decay (``dt*A``, cumulative sums, their exponentials) and every state
(incoming, chained, final) is computed in float32, or float64 for float64 inputs, because the
state is a running product over the whole stream. The products that make the output or a chunk's
own contribution take their operands in the dtype of ``x``, so bf16 inputs run those on tensor
cores; for float32 or float64 inputs everything is in that dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _causal_segsum(cs: Tensor) -> Tensor:
    """``cs_t - cs_s`` for ``s <= t`` and -inf above the diagonal, so its exp is the decay mask.

    Masking before the exp keeps the (positive, possibly huge) upper differences from
    overflowing. cs: (..., T) -> (..., T, T). Within one chunk |cs| <= T*max|dt*A|, so the
    differences lose little to rounding.
    """
    length = cs.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=cs.device).tril()  # (T, T)
    seg = cs.unsqueeze(-1) - cs.unsqueeze(-2)  # (..., T, T)
    return seg.masked_fill(~causal, float("-inf"))  # (..., T, T)


def _stable_segsum(log_a: Tensor) -> Tensor:
    """``sum_{s<u<=t} log_a_u`` for ``s <= t``, -inf above the diagonal. log_a: (..., Z) -> (..., Z, Z).

    Summed term by term rather than as differences of one cumulative sum: over chunk
    boundaries the cumulative sum grows with the stream length, and differences of two large
    numbers would lose the short-range decays.
    """
    length = log_a.shape[-1]
    ones = torch.ones(length, length, dtype=torch.bool, device=log_a.device)  # (Z, Z)
    strict = ones.tril(-1)  # (Z, Z): u > s
    terms = log_a.unsqueeze(-1).expand(*log_a.shape, length).masked_fill(~strict, 0)  # (..., Z, Z)
    return terms.cumsum(-2).masked_fill(~ones.tril(), float("-inf"))  # (..., Z, Z)


def _pad_time(v: Tensor, pad: int) -> Tensor:
    """Zeros appended along dim 1 (tokens). With dt = 0 a padded step decays by 1 and adds nothing."""
    return F.pad(v, (0, 0) * (v.dim() - 2) + (0, pad))


def ssd_chunked(
    x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, s0: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """The selective scan over L tokens in parallel, chunks of ``chunk`` tokens, no loop.

    x: (B, L, H, P), dt: (B, L, H) positive, a: (H,) negative, b, c: (B, L, N),
    s0: (B, H, P, N). Any L >= 1: the tail chunk is zero-padded (dt = 0), so the final state is
    the state after exactly L tokens. Returns y (B, L, H, P) in the dtype of x, without the skip
    term, and the final state (B, H, P, N) in float32 (float64 for float64 x).
    """
    batch, length, heads, head_dim = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    mm = x.dtype
    t = min(chunk, length)
    w = -(-length // t)
    x, dt, b, c = (_pad_time(v, w * t - length) for v in (x, dt, b, c))
    dt = dt.to(acc).reshape(batch, w, t, heads)  # (B, W, T, H)
    xdt = (x.to(acc).reshape(batch, w, t, heads, head_dim) * dt.unsqueeze(-1)).to(mm)  # (B, W, T, H, P)
    b = b.to(mm).reshape(batch, w, t, -1)  # (B, W, T, N)
    c = c.to(mm).reshape(batch, w, t, -1)  # (B, W, T, N)
    cs = (dt * a.to(acc)).permute(0, 3, 1, 2).cumsum(-1)  # (B, H, W, T)

    scores = torch.einsum("bwtn,bwsn->bwts", c, b)  # (B, W, T, T)
    mixer = scores.unsqueeze(1) * torch.exp(_causal_segsum(cs)).to(mm)  # (B, H, W, T, T)
    y = torch.einsum("bhwts,bwshp->bwthp", mixer, xdt).to(acc)  # (B, W, T, H, P)

    to_end = torch.exp(cs[..., -1:] - cs).permute(0, 2, 3, 1).unsqueeze(-1)  # (B, W, T, H, 1)
    own = torch.einsum("bwsn,bwshp->bwhpn", b, (xdt * to_end.to(mm))).to(acc)  # (B, W, H, P, N)
    chain = torch.exp(_stable_segsum(F.pad(cs[..., -1], (1, 0))))  # (B, H, W+1, W+1)
    stacked = torch.cat([s0.to(acc).unsqueeze(1), own], dim=1)  # (B, W+1, H, P, N)
    states = torch.einsum("bhzv,bvhpn->bzhpn", chain, stacked)  # (B, W+1, H, P, N)

    from_start = torch.exp(cs).permute(0, 2, 3, 1).unsqueeze(-1)  # (B, W, T, H, 1)
    y_in = torch.einsum("bwtn,bwhpn->bwthp", c, states[:, :-1].to(mm)).to(acc)  # (B, W, T, H, P)
    y = (y + from_start * y_in).reshape(batch, w * t, heads, head_dim)  # (B, W*T, H, P)
    return y[:, :length].to(mm), states[:, -1]  # (B, L, H, P)


def ssd_step(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """One token of the recurrence, without the skip term, in the dtype of its inputs.

    x: (B, H, P), dt: (B, H), a: (H,), b, c: (B, N), s: (B, H, P, N) -> y (B, H, P), s'.
    """
    decay = torch.exp(dt * a)[..., None, None]  # (B, H, 1, 1)
    update = (dt.unsqueeze(-1) * x).unsqueeze(-1) * b[:, None, None, :]  # (B, H, P, N)
    s_new = decay * s + update  # (B, H, P, N)
    return torch.einsum("bhpn,bn->bhp", s_new, c), s_new  # (B, H, P)
