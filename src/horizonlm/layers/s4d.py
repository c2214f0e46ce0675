"""The S4D core: a diagonal complex SSM per channel (DESIGN.md part 1), real state in and out."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from horizonlm.devices import autocast_dtype
from horizonlm.layers.derived import Derived
from horizonlm.layers.param_tags import SSM_PARAM_TAG
from horizonlm.ops.s4d import discretize, s4d_chunked, s4d_step


class S4DCore(nn.Module):
    """``y = SSM(u) + D*u`` per channel, with S4D-Lin initialisation: ``A_n = -1/2 + i*pi*n``,
    ``log dt ~ U(log dt_min, log dt_max)``.

    Its input and output are channel-major, (D, B, L): the sublayer's projections write and
    read that layout for free (a transposed GEMM operand), and in it every chunk of every channel
    is a contiguous row, so the chunked products need no transposed copies. Parallel mode is
    ``ops.s4d.s4d_chunked`` (chunks of ``chunk`` tokens on matrix units; under autocast its
    products take bf16 operands with float32 accumulation, the chunk states stay float32); one
    token is the recurrence. The state is real, (B, D, N/2, 2): (Re, Im) of the N/2 modes, the
    conjugate half implicit in the ``2*Re`` of the output. The SSM parameters are tagged for
    their own optimizer group.
    """

    channel_major = True
    """Takes and returns (D, B, L) (see :class:`horizonlm.layers.ssm.SSMSublayer`)."""

    def __init__(self, d_model: int, state_size: int, chunk: int, dt_min: float, dt_max: float,
                 recompute: bool = False) -> None:
        super().__init__()
        half = state_size // 2
        self.chunk = chunk
        self.recompute = recompute
        log_dt = torch.rand(d_model) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)  # (D,)
        self.log_dt = nn.Parameter(log_dt)
        self.a_log_re = nn.Parameter(torch.full((d_model, half), math.log(0.5)))  # (D, N/2)
        self.a_im = nn.Parameter(math.pi * torch.arange(half, dtype=torch.float32).repeat(d_model, 1))  # (D, N/2)
        self.c = nn.Parameter(torch.randn(d_model, half, 2) * math.sqrt(0.5))  # (D, N/2, 2): Re, Im of C
        self.d = nn.Parameter(torch.ones(d_model))  # (D,)
        for p in (self.log_dt, self.a_log_re, self.a_im, self.c, self.d):
            setattr(p, SSM_PARAM_TAG, True)
        # The one-token step's operators, kept between decode steps.
        self.kept = Derived[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]()

    def init_state(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        real = torch.float64 if self.d.dtype == torch.float64 else torch.float32
        channels, half = self.a_im.shape
        return torch.zeros(batch_size, channels, half, 2, dtype=real, device=device or self.d.device)  # (B, D, N/2, 2)

    def forward(self, u: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """u: (D, B, L) -> y (D, B, L) in the autocast dtype (u's dtype outside autocast), new
        state (B, D, N/2, 2)."""
        if state is None:
            state = self.init_state(u.shape[1], u.device)
        if self.recompute and torch.is_grad_enabled() and u.shape[2] > 1:
            y, new_state = checkpoint(self._ssm, u, state, use_reentrant=False)  # (B, L, D)
        else:
            y, new_state = self._ssm(u, state)  # (B, L, D)
        return y, new_state

    @torch.compiler.disable
    def _ssm(self, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Operators in float32 (float64 for a float64 module) outside autocast; the chunk
        products in the autocast dtype when one is in force. Outside torch.compile, which does
        not handle the complex arithmetic of the operators or the Triton scan."""
        compute = state.dtype
        matmul_dtype = autocast_dtype(u.device) or compute
        with torch.autocast(device_type=u.device.type, enabled=False):
            if u.shape[2] == 1:
                _, a_bar, b_bar, c, skip = self._step_operators(compute)  # (D, N/2) x4, (D,)
                x = u[..., 0].t().to(compute)  # (B, D)
                y, new_state = s4d_step(x, a_bar, b_bar, c, state)  # (B, D)
                return (y + skip * x).t().unsqueeze(-1).to(matmul_dtype), new_state  # (D, B, 1)
            dt_a, _, b_bar, c, skip = self._operators(compute)  # (D, N/2) x4, (D,)
            return s4d_chunked(u, dt_a, b_bar, c, state, self.chunk, matmul_dtype, skip)  # (D, B, L)

    def _operators(self, compute: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``dt*A``, ``Abar``, ``Bbar``, C (complex, (D, N/2)) and D ((D,)) in ``compute``."""
        dt_a, a_bar, b_bar = discretize(self.a_log_re.to(compute), self.a_im.to(compute), self.log_dt.to(compute))
        c = torch.view_as_complex(self.c.to(compute).contiguous())  # (D, N/2)
        return dt_a, a_bar, b_bar, c, self.d.to(compute)

    def _step_operators(self, compute: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """:meth:`_operators` for a one-token step, kept between steps made without gradients
        (:class:`horizonlm.layers.derived.Derived`): a decode step does not redo the
        discretisation's eight kernels in each of the model's blocks."""
        params = (self.a_log_re, self.a_im, self.log_dt, self.c, self.d)
        return self.kept(params, compute, lambda: self._operators(compute))
