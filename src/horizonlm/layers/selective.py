"""The selective SSM core (``ssm_kind="selective"``): Mamba-2's SSD with one B/C group."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from horizonlm.devices import autocast_dtype
from horizonlm.layers.param_tags import SSM_PARAM_TAG
from horizonlm.ops.ssd import ssd_chunked, ssd_step


class SelectiveSSM(nn.Module):
    """Input-dependent SSM over H = D/P heads of P channels, state (P, N) per head.

    From the input, one Linear gives per token a raw step size per head and B, C (N each,
    shared by all heads): ``dt = softplus(raw + dt_bias)``, ``A = -exp(A_log)``, and
    ``y = SSD(x; dt, A, B, C) + D*x`` (``ops.ssd``). Unlike a Mamba-2 block it has no
    in-projection, convolution, gate or out-projection of its own: the HorizonLM block supplies
    a gate, an output projection and the multi-resolution convolution, so this is the core
    only. The Linear has no bias, as in Mamba-2, since ``dt_bias`` is the step size's bias.
    Initialisation as in Mamba-2: ``A ~ -U(1, 16)``, ``softplus(dt_bias)`` log-uniform in
    ``[dt_min, dt_max]``, ``D = 1``.

    The scan runs outside autocast: the decays and the state (B, H, P, N) are float32 (float64
    for a float64 module), and under autocast the output-sized products take bf16 operands
    (see ``ops.ssd``). Measured on CPU bf16 autocast against float32 (D = 64, L = 300): 6e-3
    of the output's largest value, 4e-3 of the state's; the tests allow 3e-2. All real
    arithmetic, so the scan is left to torch.compile (it compiles with ``fullgraph=True``).
    """

    def __init__(self, d_model: int, state_size: int, head_dim: int, chunk: int, dt_min: float,
                 dt_max: float, recompute: bool = False) -> None:
        super().__init__()
        if d_model % head_dim:
            raise ValueError(f"head_dim={head_dim} must divide d_model={d_model}")
        heads = d_model // head_dim
        self.heads, self.head_dim, self.state_size = heads, head_dim, state_size
        self.chunk = chunk
        self.recompute = recompute
        self.proj = nn.Linear(d_model, heads + 2 * state_size, bias=False)
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(1, 16).log())  # (H,)
        log_dt = torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)  # (H,)
        dt = torch.exp(log_dt)  # (H,)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # (H,): inverse softplus
        self.D = nn.Parameter(torch.ones(heads))  # (H,)
        for p in (self.A_log, self.dt_bias, self.D):
            setattr(p, SSM_PARAM_TAG, True)

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return self.heads, self.head_dim, self.state_size

    def _compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.D.dtype == torch.float64 else torch.float32

    def init_state(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        return torch.zeros(batch_size, *self.state_shape, dtype=self._compute_dtype(),
                           device=device or self.D.device)  # (B, H, P, N)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: (B, L, D), state: (B, H, P, N) -> y (B, L, D) in the dtype of x, new state."""
        batch, length, width = x.shape
        if state is None:
            state = self.init_state(batch, x.device)
        raw, b, c = self.proj(x).split([self.heads, self.state_size, self.state_size], dim=-1)  # (B, L, .)
        xh = x.reshape(batch, length, self.heads, self.head_dim)  # (B, L, H, P)
        if self.recompute and torch.is_grad_enabled() and length > 1:
            y, new_state = checkpoint(self._scan, xh, raw, b, c, state, use_reentrant=False)  # (B, L, H, P)
        else:
            y, new_state = self._scan(xh, raw, b, c, state)  # (B, L, H, P)
        return y.reshape(batch, length, width), new_state  # (B, L, D)

    def _scan(self, x: Tensor, raw: Tensor, b: Tensor, c: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """``SSD(x) + D*x`` with autocast off, so the state and decays stay in full precision;
        under autocast the big products get its dtype explicitly. One token is the recurrence."""
        device = x.device.type
        compute = self._compute_dtype()
        mm = autocast_dtype(device) or compute
        with torch.autocast(device_type=device, enabled=False):
            dt = F.softplus(raw.to(compute) + self.dt_bias.to(compute))  # (B, L, H)
            a = -torch.exp(self.A_log.to(compute))  # (H,)
            state = state.to(compute)
            if x.shape[1] == 1:
                y, new_state = ssd_step(x[:, 0].to(compute), dt[:, 0], a, b[:, 0].to(compute),
                                        c[:, 0].to(compute), state)  # (B, H, P)
                y = y.unsqueeze(1)  # (B, 1, H, P)
            else:
                y, new_state = ssd_chunked(x.to(mm), dt, a, b, c, state, self.chunk)  # (B, L, H, P)
            y = y.to(compute) + self.D.to(compute)[:, None] * x.to(compute)  # (B, L, H, P)
        return y.to(x.dtype), new_state
