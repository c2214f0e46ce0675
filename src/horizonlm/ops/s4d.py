"""S4D diagonal state-space operator (Gu et al., 2022, "On the Parameterization and
Initialization of Diagonal State Space Models").

Per channel h and mode n, continuous ``A = -exp(A_log_re) + i*A_im`` is discretised with a
zero-order hold: ``Abar = exp(dt*A)``, ``Bbar = (Abar - 1)/A``. The output
``y_t = 2*Re(C . x_t) + D*u_t`` with ``x_t = Abar*x_{t-1} + Bbar*u_t`` is computed either by the
recurrence (one token) or as a causal convolution with kernel
``K[h, l] = 2*Re(sum_n C*Bbar*Abar**l)`` by FFT, in windows of ``chunk`` tokens whose boundary
states are carried by the closed form ``x_T = Abar**T x_0 + sum_s Abar**(T-1-s) Bbar u_s``.

All functions compute in the precision of their inputs (float32 -> complex64, float64 ->
complex128), so the float64 references in ``s4d_ref`` can check them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def discretize(a_log_re: Tensor, a_im: Tensor, log_dt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ZOH discretisation. Returns ``dtA`` (H, N), ``Abar`` (H, N) and ``Bbar`` (H, N), complex."""
    a = torch.complex(-torch.exp(a_log_re), a_im)  # (H, N)
    dt = torch.exp(log_dt).unsqueeze(-1)  # (H, 1)
    dt_a = dt * a  # (H, N)
    a_bar = torch.exp(dt_a)  # (H, N)
    b_bar = (a_bar - 1) / a  # (H, N)
    return dt_a, a_bar, b_bar


def _powers(dt_a: Tensor, start: int, length: int) -> Tensor:
    """``Abar**l`` for l in [start, start + length), computed as ``exp(l*dt*A)`` (stable, |.| <= 1)."""
    real_dtype = dt_a.real.dtype
    steps = torch.arange(start, start + length, device=dt_a.device, dtype=real_dtype)  # (T,)
    return torch.exp(dt_a.unsqueeze(-1) * steps)  # (H, N, T)


def s4d_kernel(dt_a: Tensor, b_bar: Tensor, c: Tensor, length: int) -> Tensor:
    """Convolution kernel ``K[h, l] = 2*Re(sum_n C*Bbar*Abar**l)``, shape (H, length)."""
    powers = _powers(dt_a, 0, length)  # (H, N, T)
    return 2 * torch.einsum("hn,hnl->hl", c * b_bar, powers).real  # (H, T)


def fft_causal_conv(u: Tensor, kernel: Tensor) -> Tensor:
    """Causal convolution ``y[l] = sum_{s<=l} kernel[l-s] u[s]`` by an FFT of length 2L.

    u: (..., L), kernel: (..., L) broadcastable against u -> (..., L).
    """
    length = u.shape[-1]
    n_fft = 2 * length
    u_f = torch.fft.rfft(u, n=n_fft)  # (..., L+1)
    k_f = torch.fft.rfft(kernel, n=n_fft)  # (..., L+1)
    return torch.fft.irfft(u_f * k_f, n=n_fft)[..., :length]  # (..., L)


def _windows(
    u: Tensor, dt_a: Tensor, a_bar: Tensor, b_bar: Tensor, c: Tensor, x0: Tensor
) -> tuple[Tensor, Tensor]:
    """W consecutive windows of T tokens each, state in and out, without the skip term.

    u: (B, H, W, T) real, x0: (B, H, N) complex. The FFT convolution handles each window from a
    zero state; the state entering window w adds ``2*Re(C . Abar**(t+1) x_w)``. The two
    state-sized contractions are written as real matrix products over stacked (Re, Im) parts,
    so they run on real GEMMs and never materialise a complex copy of u.
    Returns y (B, H, W, T) and the state after the last window (B, H, N).
    """
    windows, length = u.shape[2], u.shape[3]
    n = dt_a.shape[-1]
    powers = _powers(dt_a, 0, length)  # (H, N, T)
    kernel = 2 * torch.einsum("hn,hnl->hl", c * b_bar, powers).real  # (H, T)
    y = fft_causal_conv(u, kernel.unsqueeze(1))  # (B, H, W, T)
    # z_w = sum_s Abar**(T-1-s) Bbar u_s: each window's contribution to the state at its end.
    decay = (b_bar.unsqueeze(-1) * powers).flip(-1)  # (H, N, T)
    decay_ri = torch.cat([decay.real, decay.imag], dim=1)  # (H, 2N, T)
    z_ri = torch.einsum("bhwl,hnl->bhwn", u, decay_ri)  # (B, H, W, 2N)
    z = torch.complex(z_ri[..., :n], z_ri[..., n:])  # (B, H, W, N)
    a_window = a_bar.pow(length)  # (H, N)
    entering = []
    x = x0
    for w in range(windows):
        entering.append(x)
        x = a_window * x + z[:, :, w]  # (B, H, N)
    x_in = torch.stack(entering, dim=2)  # (B, H, W, N)
    # 2*Re(x . Q) = [Re x, Im x] . [2 Re Q; -2 Im Q] with Q = C * Abar**(t+1).
    q = (c * a_bar).unsqueeze(-1) * powers  # (H, N, T)
    q_ri = torch.cat([2 * q.real, -2 * q.imag], dim=1)  # (H, 2N, T)
    x_ri = torch.cat([x_in.real, x_in.imag], dim=-1)  # (B, H, W, 2N)
    y = y + torch.einsum("bhwn,hnl->bhwl", x_ri, q_ri)  # (B, H, W, T)
    return y, x


def s4d_window(
    u: Tensor, dt_a: Tensor, a_bar: Tensor, b_bar: Tensor, c: Tensor, x0: Tensor
) -> tuple[Tensor, Tensor]:
    """One window in parallel mode, state in and out, without the ``D*u`` skip term.

    u: (B, H, T) real, x0: (B, H, N) complex. Returns y (B, H, T) and the final state (B, H, N).
    """
    y, x_end = _windows(u.unsqueeze(2), dt_a, a_bar, b_bar, c, x0)  # (B, H, 1, T)
    return y.squeeze(2), x_end  # (B, H, T)


def s4d_step(u: Tensor, a_bar: Tensor, b_bar: Tensor, c: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """One recurrent step without the skip term. u: (B, H) real, x: (B, H, N) -> y (B, H), x'."""
    x_new = a_bar * x + b_bar * u.unsqueeze(-1)  # (B, H, N)
    y = 2 * torch.einsum("hn,bhn->bh", c, x_new).real  # (B, H)
    return y, x_new


def s4d_scan(
    u: Tensor,
    dt_a: Tensor,
    a_bar: Tensor,
    b_bar: Tensor,
    c: Tensor,
    x0: Tensor,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """The S4D map over a sequence of any length, without the skip term.

    Windows of ``chunk`` tokens are convolved in parallel (FFT of length 2*chunk), so memory is
    O(H*N*chunk) whatever L is; window boundary states are chained by the closed form. One
    token uses the recurrence. u: (B, H, L) real, x0: (B, H, N) complex.
    Returns y (B, H, L) and the final state (B, H, N).
    """
    batch, channels, length = u.shape
    if length == 1:
        y, x_end = s4d_step(u[..., 0], a_bar, b_bar, c, x0)
        return y.unsqueeze(-1), x_end  # (B, H, 1)
    if length <= chunk:
        return s4d_window(u, dt_a, a_bar, b_bar, c, x0)
    n_full = length // chunk
    main = u[..., : n_full * chunk].reshape(batch, channels, n_full, chunk)  # (B, H, W, T)
    y, x = _windows(main, dt_a, a_bar, b_bar, c, x0)  # (B, H, W, T)
    y = y.reshape(batch, channels, n_full * chunk)  # (B, H, W*T)
    rest = length - n_full * chunk
    if rest == 0:
        return y, x
    y_rest, x_end = s4d_scan(u[..., n_full * chunk :], dt_a, a_bar, b_bar, c, x, chunk)  # (B, H, rest)
    return torch.cat([y, y_rest], dim=-1), x_end  # (B, H, L)
