"""Slow, obviously-correct twins of the fast operators, written as explicit loops.

Tests run them in float64 and compare outputs, final states and gradients with the fast paths.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def s4d_recurrence_ref(
    u: Tensor, a_bar: Tensor, b_bar: Tensor, c: Tensor, x0: Tensor
) -> tuple[Tensor, Tensor]:
    """``x_t = Abar*x_{t-1} + Bbar*u_t``, ``y_t = 2*Re(C . x_t)``, one token at a time.

    u: (B, H, L) real, x0: (B, H, N) complex. Returns y (B, H, L), final state (B, H, N).
    """
    x = x0
    ys = []
    for t in range(u.shape[-1]):
        x = a_bar * x + b_bar * u[..., t].unsqueeze(-1)  # (B, H, N)
        ys.append(2 * (c * x).sum(-1).real)  # (B, H)
    return torch.stack(ys, dim=-1), x  # (B, H, L)


def causal_conv_ref(x: Tensor, buffer: Tensor, weight: Tensor, mix: Tensor) -> tuple[Tensor, Tensor]:
    """Explicit sum ``y[t] = sum_r mix[r] sum_j w[r, :, j] * x[t - (k-1-j)*2**r]`` over past inputs.

    x: (B, L, D), buffer: (B, P, D), weight: (R, D, k), mix: (R,).
    """
    levels, _, kernel_size = weight.shape
    pad = buffer.shape[1]
    full = torch.cat([buffer, x], dim=1)  # (B, P+L, D)
    y = torch.zeros_like(x)  # (B, L, D)
    for t in range(x.shape[1]):
        for r in range(levels):
            for j in range(kernel_size):
                src = pad + t - (kernel_size - 1 - j) * 2**r
                y[:, t] = y[:, t] + mix[r] * weight[r, :, j] * full[:, src]
    return y, full[:, full.shape[1] - pad :]  # (B, P, D)


def memory_read_ref(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    entry_ids: Tensor,
    completed_before: Tensor,
    capacity: int,
    top_k: int,
    tau: float,
    null_score: Tensor | None = None,
    tau_growth: Tensor | None = None,
    live_from: Tensor | None = None,
) -> Tensor:
    """Brute force: for every token, score every visible entry, sort, softmax over the best K
    (and, with ``null_score``, a null entry of value zero and score ``null_score``); with
    ``tau_growth`` a, the token's tau is ``tau (1 + a log n)``, n its visible entries (of chunks
    from ``live_from[b]`` on, where given)."""
    batch, length, _ = queries.shape
    out = queries.new_zeros(batch, length, values.shape[-1])  # (B, L, Dv)
    for b in range(batch):
        for t in range(length):
            seen = int(completed_before[t])
            # newest first, so that a stable sort ranks equal scores newest first
            visible = [m for m in reversed(range(keys.shape[1])) if seen - capacity <= int(entry_ids[m]) < seen]
            if not visible:
                continue
            scores = torch.stack([queries[b, t] @ keys[b, m] for m in visible])  # (V,)
            order = torch.argsort(scores, descending=True, stable=True)[:top_k]  # (K,)
            # entries of chunks before live_from[b] (a stream restarted cold) are not counted
            live = sum(live_from is None or int(entry_ids[m]) >= int(live_from[b]) for m in visible)
            tau_t = tau if tau_growth is None else tau * (1 + tau_growth * math.log(max(live, 1)))
            logits = tau_t * scores[order]  # (K,)
            if null_score is not None:
                logits = torch.cat([logits, (tau_t * null_score).reshape(1).to(logits.dtype)])  # (K+1,)
            weights = torch.softmax(logits, dim=0)[: len(order)]  # (K,)
            picked = torch.stack([values[b, visible[i]] for i in order.tolist()])  # (K, Dv)
            out[b, t] = weights @ picked
    return out


def ssd_recurrence_ref(
    x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, s0: Tensor
) -> tuple[Tensor, Tensor]:
    """``S_t = exp(dt_t*A)*S_{t-1} + dt_t * x_t B_t^T``, ``y_t = S_t C_t``, one token at a time.

    x: (B, L, H, P), dt: (B, L, H), a: (H,), b, c: (B, L, N), s0: (B, H, P, N).
    Returns y (B, L, H, P), final state (B, H, P, N).
    """
    s = s0
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * a)  # (B, H)
        outer = x[:, t, :, :, None] * b[:, t, None, None, :]  # (B, H, P, N)
        s = decay[:, :, None, None] * s + dt[:, t, :, None, None] * outer  # (B, H, P, N)
        ys.append((s * c[:, t, None, None, :]).sum(-1))  # (B, H, P)
    return torch.stack(ys, dim=1), s  # (B, L, H, P)
