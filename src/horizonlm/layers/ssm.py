"""The S4D sequence layer: a diagonal complex SSM per channel, then GELU and an output projection."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from horizonlm.ops.s4d import discretize, s4d_scan

SSM_PARAM_TAG = "horizon_ssm"
"""Attribute set on S4D parameters: they get no weight decay and their own learning rate."""


class S4DLayer(nn.Module):
    """S4D with S4D-Lin initialisation: ``A_n = -1/2 + i*pi*n``, ``log dt ~ U(log dt_min, log dt_max)``.

    Parallel mode is the chunked FFT convolution of ``ops.s4d.s4d_scan``; one token is the
    recurrence. The state is ``x`` (B, D, N/2), complex; the conjugate half is implicit in the
    ``2*Re`` of the output.
    """

    def __init__(self, d_model: int, state_size: int, fft_chunk: int, dt_min: float, dt_max: float,
                 recompute: bool = False) -> None:
        super().__init__()
        half = state_size // 2
        self.fft_chunk = fft_chunk
        self.recompute = recompute
        log_dt = torch.rand(d_model) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)  # (D,)
        self.log_dt = nn.Parameter(log_dt)
        self.a_log_re = nn.Parameter(torch.full((d_model, half), math.log(0.5)))  # (D, N/2)
        self.a_im = nn.Parameter(math.pi * torch.arange(half, dtype=torch.float32).repeat(d_model, 1))  # (D, N/2)
        self.c = nn.Parameter(torch.randn(d_model, half, 2) * math.sqrt(0.5))  # (D, N/2, 2): Re, Im of C
        self.d = nn.Parameter(torch.ones(d_model))  # (D,)
        for p in (self.log_dt, self.a_log_re, self.a_im, self.c, self.d):
            setattr(p, SSM_PARAM_TAG, True)
        self.out = nn.Linear(d_model, d_model)

    @property
    def state_shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.a_im.shape[1]

    def init_state(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        real = torch.float64 if self.d.dtype == torch.float64 else torch.float32
        complex_dtype = torch.complex128 if real == torch.float64 else torch.complex64
        return torch.zeros(batch_size, *self.state_shape, dtype=complex_dtype, device=device or self.d.device)  # (B, D, N/2)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if state is None:
            state = self.init_state(x.shape[0], x.device)
        compute = torch.float64 if self.d.dtype == torch.float64 else torch.float32
        u = x.to(compute).transpose(1, 2)  # (B, D, L)
        if self.recompute and torch.is_grad_enabled() and u.shape[-1] > 1:
            y, new_state = checkpoint(self._ssm, u, state, use_reentrant=False)  # (B, D, L)
        else:
            y, new_state = self._ssm(u, state)  # (B, D, L)
        y = F.gelu(y.transpose(1, 2)).to(x.dtype)  # (B, L, D)
        return self.out(y), new_state  # (B, L, D)

    @torch.compiler.disable
    def _ssm(self, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """``y = SSM(u) + D*u`` in float32 (or float64), outside autocast (and outside
        torch.compile, which does not handle its complex arithmetic)."""
        compute = u.dtype
        with torch.autocast(device_type=u.device.type, enabled=False):
            dt_a, a_bar, b_bar = discretize(self.a_log_re.to(compute), self.a_im.to(compute), self.log_dt.to(compute))
            c = torch.view_as_complex(self.c.to(compute).contiguous())  # (D, N/2)
            y, new_state = s4d_scan(u, dt_a, a_bar, b_bar, c, state, self.fft_chunk)  # (B, D, L)
            return y + self.d.to(compute).unsqueeze(-1) * u, new_state  # (B, D, L)
