"""S4D diagonal state-space operator (Gu et al., 2022, "On the Parameterization and
Initialization of Diagonal State Space Models"), in a chunked form that runs on matrix units.

Per channel h and mode n, continuous ``A = -exp(A_log_re) + i*A_im`` is discretised with a
zero-order hold: ``Abar = exp(dt*A)``, ``Bbar = (Abar - 1)/A``. The map
``x_t = Abar*x_{t-1} + Bbar*u_t``, ``y_t = 2*Re(C . x_t)`` (plus the skip ``D*u_t``, which the
chunked form puts on the diagonal of its Toeplitz matrix) is the causal convolution with kernel
``K[h, l] = 2*Re(sum_n C*Bbar*Abar**l)``.

Parallel form (``s4d_chunked``): the sequence is cut into W chunks of T tokens. With the state
``x_w`` entering chunk w,

    y_w[t] = sum_{s<=t} K[t-s] u_w[s]          (a (T, T) causal Toeplitz matrix, per channel)
           + 2*Re(C . Abar**(t+1) x_w)          (state read-out, a (2N', T) real matrix)
    x_{w+1} = Abar**T x_w + z_w,  z_w = sum_s Abar**(T-1-s) Bbar u_w[s]   (a (T, 2N') real matrix)

so the work is three batched matrix products per channel (bf16 operands, float32 accumulation
under autocast) and a scan over W chunk states, which ``ops.chunk_scan`` runs (a Triton kernel on
the GPU, its torch twin elsewhere). Complex numbers appear only in the (H, T)-sized operators,
never at the size of the input. States are real: (..., N', 2) holds (Re, Im) of N' = N/2 modes.

All functions compute in the precision of their inputs (float64 in, float64 out), so the float64
recurrence in ``ops.reference`` checks them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from horizonlm.ops.chunk_scan import chunk_scan


def discretize(a_log_re: Tensor, a_im: Tensor, log_dt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ZOH discretisation. Returns ``dtA`` (H, N), ``Abar`` (H, N) and ``Bbar`` (H, N), complex."""
    a = torch.complex(-torch.exp(a_log_re), a_im)  # (H, N)
    dt = torch.exp(log_dt).unsqueeze(-1)  # (H, 1)
    dt_a = dt * a  # (H, N)
    a_bar = torch.exp(dt_a)  # (H, N)
    b_bar = (a_bar - 1) / a  # (H, N)
    return dt_a, a_bar, b_bar


def _powers(dt_a: Tensor, length: int) -> Tensor:
    """``Abar**l`` for l in [0, length), computed as ``exp(l*dt*A)`` (stable, |.| <= 1)."""
    real_dtype = dt_a.real.dtype
    steps = torch.arange(length, device=dt_a.device, dtype=real_dtype)  # (T,)
    return torch.exp(dt_a.unsqueeze(-1) * steps)  # (H, N, T)


def _kernel_from_powers(b_bar: Tensor, c: Tensor, powers: Tensor) -> Tensor:
    """``K[h, l] = 2*Re(sum_n C*Bbar*Abar**l)`` for the powers given, (H, N, T) -> (H, T)."""
    return 2 * torch.einsum("hn,hnl->hl", c * b_bar, powers).real  # (H, T)


def s4d_kernel(dt_a: Tensor, b_bar: Tensor, c: Tensor, length: int) -> Tensor:
    """Convolution kernel ``K[h, l] = 2*Re(sum_n C*Bbar*Abar**l)``, shape (H, length)."""
    return _kernel_from_powers(b_bar, c, _powers(dt_a, length))  # (H, T)


def chunk_operators(dt_a: Tensor, b_bar: Tensor, c: Tensor, chunk: int,
                    skip: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The real matrices of one chunk of T tokens, per channel.

    Returns ``toeplitz`` (H, T, T) with ``[t, s] = K[t-s]`` for s <= t (plus ``skip``, the D of
    ``D*u``, on the diagonal, so the skip term costs nothing); ``to_state`` (H, T, 2N) mapping a
    chunk's inputs to its contribution z (Re block, then Im block); ``read_out`` (H, 2N, T)
    mapping the entering state (Re, Im) to the outputs; ``a_chunk`` (H, N, 2), the (Re, Im) of
    ``Abar**T``.
    """
    powers = _powers(dt_a, chunk + 1)  # (H, N, T+1)
    kernel = _kernel_from_powers(b_bar, c, powers[..., :chunk])  # (H, T)
    if skip is not None:
        kernel = torch.cat([kernel[:, :1] + skip.unsqueeze(-1), kernel[:, 1:]], dim=1)  # (H, T)
    padded = torch.nn.functional.pad(kernel, (chunk - 1, 0))  # (H, 2T-1): T-1 zeros, then K
    toeplitz = padded.unfold(1, chunk, 1).flip(-1)  # (H, T, T): [t, s] = padded[t + T-1 - s]
    decay = b_bar.unsqueeze(-1) * powers[..., :chunk].flip(-1)  # (H, N, T)
    to_state = torch.cat([decay.real, decay.imag], dim=1).transpose(1, 2)  # (H, T, 2N)
    q = c.unsqueeze(-1) * powers[..., 1:]  # (H, N, T)
    read_out = torch.cat([2 * q.real, -2 * q.imag], dim=1)  # (H, 2N, T)
    a_chunk = torch.view_as_real(powers[..., chunk])  # (H, N, 2)
    return toeplitz, to_state, read_out, a_chunk


def _split_state(x: Tensor) -> Tensor:
    """(B, H, N, 2) state -> (H, B, 2N): the Re block, then the Im block, as the operators expect."""
    return x.permute(1, 0, 3, 2).flatten(2)  # (H, B, 2N)


def _join_state(x: Tensor, modes: int) -> Tensor:
    """(H, B, 2N) -> (B, H, N, 2)."""
    return x.unflatten(2, (2, modes)).permute(1, 0, 3, 2)  # (B, H, N, 2)


def _full_chunks(u: Tensor, ops: tuple[Tensor, Tensor, Tensor, Tensor], x0: Tensor,
                 matmul_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """W whole chunks. u: (H, B, W, T), x0: (H, B, 2N) -> y (H, B, W, T), state (H, B, 2N)."""
    toeplitz, to_state, read_out, a_chunk = ops
    channels, batch, windows, length = u.shape
    uc = u.reshape(channels, batch * windows, length).to(matmul_dtype)  # (H, B*W, T)
    y = torch.bmm(uc, toeplitz.transpose(1, 2).to(matmul_dtype))  # (H, B*W, T)
    z = torch.bmm(uc, to_state.to(matmul_dtype))  # (H, B*W, 2N)
    z = z.to(x0.dtype).view(channels, batch, windows, -1)  # (H, B, W, 2N)
    x_in, x_end = chunk_scan(z, a_chunk.to(x0.dtype), x0)  # (H, B, W, 2N), (H, B, 2N)
    x_in = x_in.reshape(channels, batch * windows, -1).to(matmul_dtype)  # (H, B*W, 2N)
    y = torch.baddbmm(y, x_in, read_out.to(matmul_dtype))  # (H, B*W, T)
    return y.view(channels, batch, windows, length), x_end  # (H, B, W, T)


def s4d_chunked(u: Tensor, dt_a: Tensor, b_bar: Tensor, c: Tensor, x0: Tensor, chunk: int,
                matmul_dtype: torch.dtype | None = None, skip: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The S4D map over a sequence of any length, plus ``skip * u`` when ``skip`` (H,) is given.

    u: (H, B, L) real, channel-major so that every chunk is a contiguous (T,) row and the
    products need no transposed copy; x0: (B, H, N, 2) real state. The matrix products take
    ``matmul_dtype`` operands (default: u's dtype); the chunk states are chained in x0's dtype.
    A tail shorter than ``chunk`` is one more chunk of its own length.
    Returns y (H, B, L) in ``matmul_dtype`` and the final state (B, H, N, 2).
    """
    channels, batch, length = u.shape
    modes = x0.shape[2]
    matmul_dtype = matmul_dtype or u.dtype
    u = u.to(matmul_dtype)
    x = _split_state(x0)  # (H, B, 2N)
    n_full = length // chunk
    rest = length - n_full * chunk
    pieces = []
    if n_full:
        ops = chunk_operators(dt_a, b_bar, c, chunk, skip)
        main = u[..., : n_full * chunk]  # (H, B, W*T)
        y, x = _full_chunks(main.reshape(channels, batch, n_full, chunk), ops, x, matmul_dtype)  # (H, B, W, T)
        pieces.append(y.view(channels, batch, n_full * chunk))  # (H, B, W*T)
    if rest:
        ops = chunk_operators(dt_a, b_bar, c, rest, skip)
        y, x = _full_chunks(u[..., n_full * chunk :].unsqueeze(2), ops, x, matmul_dtype)  # (H, B, 1, rest)
        pieces.append(y.squeeze(2))  # (H, B, rest)
    y = torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]  # (H, B, L)
    return y, _join_state(x, modes)


def s4d_step(u: Tensor, a_bar: Tensor, b_bar: Tensor, c: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """One recurrent step without the skip term. u: (B, H) real, x: (B, H, N, 2) real state.
    Returns y (B, H) and the new state (B, H, N, 2)."""
    xc = torch.view_as_complex(x.contiguous())  # (B, H, N)
    x_new = a_bar * xc + b_bar * u.unsqueeze(-1)  # (B, H, N)
    y = 2 * torch.einsum("hn,bhn->bh", c, x_new).real  # (B, H)
    return y, torch.view_as_real(x_new)  # (B, H, N, 2)
