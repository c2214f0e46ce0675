"""The scan over chunk states of a diagonal complex SSM: ``x_{w+1} = a*x_w + z_w``.

Every (channel, batch row, mode) is an independent complex recurrence over the W chunks of a
sequence, written in real arithmetic with the state split as (Re block, Im block). On the GPU a
Triton kernel runs it, one thread per recurrence, forward and backward (the backward is the
adjoint recurrence run from the last chunk to the first); ``chunk_scan_torch`` is its twin, a
loop over chunks that autograd differentiates, used on the CPU and as the kernel's reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def chunk_scan_torch(z: Tensor, a: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
    """z: (H, B, W, 2N) chunk contributions, a: (H, N, 2) (Re, Im) of the per-chunk decay,
    x0: (H, B, 2N) the entering state. Returns the state entering each chunk (H, B, W, 2N) and the
    state after the last one (H, B, 2N)."""
    n = a.shape[1]
    ar, ai = a[..., 0].unsqueeze(1), a[..., 1].unsqueeze(1)  # (H, 1, N)
    xr, xi = x0[..., :n], x0[..., n:]  # (H, B, N)
    entering = []
    for w in range(z.shape[2]):
        entering.append(torch.cat([xr, xi], dim=-1))  # (H, B, 2N)
        zr, zi = z[:, :, w, :n], z[:, :, w, n:]  # (H, B, N)
        xr, xi = ar * xr - ai * xi + zr, ai * xr + ar * xi + zi  # (H, B, N)
    return torch.stack(entering, dim=2), torch.cat([xr, xi], dim=-1)  # (H, B, W, 2N)


if triton is not None:

    @triton.jit
    def _lanes(n_items, batch, modes, BLOCK: tl.constexpr):
        """This program's recurrences: the mask, the (head, batch) row, the mode and the head."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        row = (offs // modes).to(tl.int64)
        return offs < n_items, row, offs % modes, row // batch

    @triton.jit
    def _load_pair(ptr, at, modes, mask):
        """(Re, Im) of mode k at ``at`` in a (.., 2N) row laid out as the Re block, then the Im block."""
        return tl.load(ptr + at, mask=mask, other=0.0), tl.load(ptr + at + modes, mask=mask, other=0.0)

    @triton.jit
    def _store_pair(ptr, at, modes, mask, re, im):
        tl.store(ptr + at, re, mask=mask)
        tl.store(ptr + at + modes, im, mask=mask)

    @triton.jit
    def _scan_forward(z_ptr, a_ptr, x0_ptr, x_in_ptr, x_end_ptr, n_items, batch, windows, modes,
                      BLOCK: tl.constexpr):
        mask, row, k, head = _lanes(n_items, batch, modes, BLOCK)
        ar, ai = _load_pair(a_ptr, head * 2 * modes + k, modes, mask)
        xr, xi = _load_pair(x0_ptr, row * 2 * modes + k, modes, mask)
        for w in range(windows):
            at = (row * windows + w) * 2 * modes + k
            _store_pair(x_in_ptr, at, modes, mask, xr, xi)
            zr, zi = _load_pair(z_ptr, at, modes, mask)
            xr, xi = ar * xr - ai * xi + zr, ai * xr + ar * xi + zi
        _store_pair(x_end_ptr, row * 2 * modes + k, modes, mask, xr, xi)

    @triton.jit
    def _scan_backward(g_in_ptr, g_end_ptr, a_ptr, x_in_ptr, g_z_ptr, g_x0_ptr, g_a_ptr, n_items, batch, windows,
                       modes, BLOCK: tl.constexpr):
        mask, row, k, head = _lanes(n_items, batch, modes, BLOCK)
        ar, ai = _load_pair(a_ptr, head * 2 * modes + k, modes, mask)
        gr, gi = _load_pair(g_end_ptr, row * 2 * modes + k, modes, mask)
        gar = tl.zeros_like(gr)
        gai = tl.zeros_like(gr)
        for i in range(windows):
            at = (row * windows + (windows - 1 - i)) * 2 * modes + k
            _store_pair(g_z_ptr, at, modes, mask, gr, gi)
            xr, xi = _load_pair(x_in_ptr, at, modes, mask)
            gar += gr * xr + gi * xi
            gai += gi * xr - gr * xi
            hr, hi = _load_pair(g_in_ptr, at, modes, mask)
            gr, gi = ar * gr + ai * gi + hr, ar * gi - ai * gr + hi
        _store_pair(g_x0_ptr, row * 2 * modes + k, modes, mask, gr, gi)
        _store_pair(g_a_ptr, row * 2 * modes + k, modes, mask, gar, gai)


_BLOCK = 256


class _TritonChunkScan(torch.autograd.Function):
    """The Triton kernels under autograd; the decay's gradient is summed over the batch here."""

    @staticmethod
    def forward(ctx, z: Tensor, a_flat: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        heads, batch, windows, two_n = z.shape
        n_items = heads * batch * (two_n // 2)
        x_in = torch.empty_like(z)  # (H, B, W, 2N)
        x_end = torch.empty_like(x0)  # (H, B, 2N)
        grid = (triton.cdiv(n_items, _BLOCK),)
        _scan_forward[grid](z, a_flat, x0, x_in, x_end, n_items, batch, windows, two_n // 2, BLOCK=_BLOCK)
        ctx.save_for_backward(a_flat, x_in)
        return x_in, x_end

    @staticmethod
    def backward(ctx, g_in: Tensor | None, g_end: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        a_flat, x_in = ctx.saved_tensors
        heads, batch, windows, two_n = x_in.shape
        g_in = torch.zeros_like(x_in) if g_in is None else g_in.contiguous()  # (H, B, W, 2N)
        g_end = x_in.new_zeros(heads, batch, two_n) if g_end is None else g_end.contiguous()  # (H, B, 2N)
        g_z = torch.empty_like(x_in)  # (H, B, W, 2N)
        g_x0 = torch.empty_like(g_end)  # (H, B, 2N)
        g_a = torch.empty_like(g_end)  # (H, B, 2N)
        n_items = heads * batch * (two_n // 2)
        grid = (triton.cdiv(n_items, _BLOCK),)
        _scan_backward[grid](g_in, g_end, a_flat, x_in, g_z, g_x0, g_a, n_items, batch, windows, two_n // 2,
                             BLOCK=_BLOCK)
        return g_z, g_a.sum(1), g_x0  # (H, B, W, 2N), (H, 2N), (H, B, 2N)


def chunk_scan_triton(z: Tensor, a: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
    """The same as :func:`chunk_scan_torch` by the Triton kernels (float32, any device Triton runs on)."""
    if triton is None:
        raise RuntimeError("chunk_scan_triton needs the triton package")
    a_flat = a.transpose(1, 2).reshape(a.shape[0], -1).contiguous()  # (H, 2N): Re block, Im block
    return _TritonChunkScan.apply(z.contiguous(), a_flat, x0.contiguous())


def chunk_scan(z: Tensor, a: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
    """Triton on a CUDA device in float32; the torch twin otherwise (CPU, float64)."""
    if triton is not None and z.is_cuda and z.dtype == torch.float32:
        return chunk_scan_triton(z, a, x0)
    return chunk_scan_torch(z, a, x0)
