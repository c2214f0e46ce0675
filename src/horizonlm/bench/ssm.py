"""``horizon bench ssm``: the SSM sublayer alone, checked against its references and timed.

Checks (on the device the benchmark runs on): the Triton chunk-state scan against its torch twin
(outputs and gradients, float32), and the chunked S4D and selective scans, in float32 and with
bf16 products, against their float64 token-by-token recurrences (outputs, final states,
gradients). Timings: forward + backward and forward alone of each sequence sublayer of a block
at the ``base`` width, bf16 autocast, with a (D, D) Linear as the yardstick.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from horizonlm.bench.common import environment, median, parse_ints, relative_error, time_cuda
from horizonlm.config import HorizonConfig
from horizonlm.devices import resolve_device
from horizonlm.fileio import atomic_write_json, refuse_existing
from horizonlm.layers.multires_conv import MultiResConv
from horizonlm.layers.ssm import SSMSublayer
from horizonlm.ops.chunk_scan import chunk_scan, chunk_scan_torch
from horizonlm.ops.reference import s4d_recurrence_ref, ssd_recurrence_ref
from horizonlm.ops.s4d import discretize, s4d_chunked
from horizonlm.ops.ssd import ssd_chunked


@dataclass
class SSMBenchConfig:
    """Settings of ``horizon bench ssm``."""

    out: str = "bench/results/ssm.json"
    """Results file (refused if it exists, unless --overwrite)."""
    overwrite: bool = False
    """Replace an existing results file."""
    preset: str = "base"
    """Preset giving the width, state size and head size of the timed layers."""
    batch_size: int = 16
    """Streams per timed call."""
    seq_len: int = 8192
    """Tokens per stream in a timed call."""
    chunks: str = "64,128,256"
    """SSM chunk lengths T to time."""
    repeat: int = 10
    """Timed repetitions per row."""
    warmup: int = 3
    """Untimed repetitions first."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        try:
            chunks = parse_ints(self.chunks)
        except ValueError as err:
            raise ValueError(f"chunks must be comma-separated integers, got {self.chunks!r}") from err
        if not chunks or min(chunks) < 8 or any(t % 8 for t in chunks):
            raise ValueError(f"chunks must be multiples of 8 (as ssm_chunk), got {self.chunks!r}")


def _grads(outputs: tuple[Tensor, ...], inputs: tuple[Tensor, ...], seed: int) -> tuple[Tensor, ...]:
    g = torch.Generator(device=outputs[0].device).manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, device=o.device, dtype=torch.float64)).sum()
               for o in outputs)
    return torch.autograd.grad(loss, inputs)


def check_chunk_scan(device: torch.device) -> dict[str, float]:
    """The dispatching scan (Triton on CUDA) against the torch twin, float32, with gradients."""
    torch.manual_seed(0)
    z = torch.randn(64, 4, 33, 64, device=device, requires_grad=True)  # (H, B, W, 2N)
    a = (torch.randn(64, 32, 2, device=device) * 0.5).requires_grad_()  # (H, N, 2)
    x0 = torch.randn(64, 4, 64, device=device, requires_grad=True)  # (H, B, 2N)
    fast = chunk_scan(z, a, x0)
    twin = chunk_scan_torch(z, a, x0)
    out = {"x_in": relative_error(fast[0], twin[0]), "x_end": relative_error(fast[1], twin[1])}
    for name, gf, gt in zip(("grad_z", "grad_a", "grad_x0"), _grads(fast, (z, a, x0), 1), _grads(twin, (z, a, x0), 1)):
        out[name] = relative_error(gf, gt)
    return out


def check_s4d(device: torch.device, matmul_dtype: torch.dtype) -> dict[str, float]:
    """Chunked S4D (float32 operators and state, ``matmul_dtype`` products) against the float64
    recurrence, over 5 chunks and a tail, with an incoming state."""
    torch.manual_seed(1)
    heads, modes, length = 32, 16, 5 * 64 + 17
    params = [torch.rand(heads, modes, device=device) - 1.5, torch.rand(heads, modes, device=device) * 6,
              torch.rand(heads, device=device) * 4.6 - 6.9, torch.randn(heads, modes, 2, device=device)]
    params = [p.requires_grad_() for p in params]
    u = torch.randn(heads, 2, length, device=device, requires_grad=True)  # (H, B, L)
    x0 = torch.randn(2, heads, modes, 2, device=device, requires_grad=True)  # (B, H, N, 2)

    def run(fast: bool) -> tuple[Tensor, Tensor]:
        dtype = torch.float32 if fast else torch.float64
        a_log_re, a_im, log_dt, c_raw = (p.to(dtype) for p in params)
        dt_a, a_bar, b_bar = discretize(a_log_re, a_im, log_dt)
        c = torch.view_as_complex(c_raw.contiguous())
        if fast:
            return s4d_chunked(u, dt_a, b_bar, c, x0, 64, matmul_dtype)  # (H, B, L)
        y, x = s4d_recurrence_ref(u.double().transpose(0, 1), a_bar, b_bar, c, torch.view_as_complex(x0.double()))
        return y.transpose(0, 1), torch.view_as_real(x)  # (H, B, L)

    fast, ref = run(True), run(False)
    inputs = (u, x0, *params)
    out = {"y": relative_error(fast[0], ref[0]), "state": relative_error(fast[1], ref[1])}
    grads = zip(_grads(fast, inputs, 2), _grads(ref, inputs, 2))
    for name, (gf, gr) in zip(("u", "x0", "a_log_re", "a_im", "log_dt", "c"), grads):
        out[f"grad_{name}"] = relative_error(gf, gr)
    return out


def check_ssd(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Chunked selective scan with ``dtype`` inputs against the float64 recurrence."""
    torch.manual_seed(2)
    batch, length, heads, head_dim, state = 2, 3 * 64 + 9, 4, 16, 32
    x = torch.randn(batch, length, heads, head_dim, device=device, requires_grad=True)  # (B, L, H, P)
    dt = (torch.rand(batch, length, heads, device=device) * 0.1).requires_grad_()  # (B, L, H)
    a = (-torch.rand(heads, device=device) * 4 - 0.5).requires_grad_()  # (H,)
    b = torch.randn(batch, length, state, device=device, requires_grad=True)  # (B, L, N)
    c = torch.randn(batch, length, state, device=device, requires_grad=True)  # (B, L, N)
    s0 = torch.randn(batch, heads, head_dim, state, device=device, requires_grad=True)  # (B, H, P, N)
    inputs = (x, dt, a, b, c, s0)
    fast = ssd_chunked(x.to(dtype), dt, a, b.to(dtype), c.to(dtype), s0, 64)
    ref = ssd_recurrence_ref(*(t.double() for t in inputs))
    out = {"y": relative_error(fast[0], ref[0]), "state": relative_error(fast[1], ref[1])}
    for name, gf, gr in zip(("x", "dt", "a", "b", "c", "s0"), _grads(fast, inputs, 3), _grads(ref, inputs, 3)):
        out[f"grad_{name}"] = relative_error(gf, gr)
    return out


def _time_layer(layer: nn.Module, cfg: SSMBenchConfig, device: torch.device, width: int) -> dict[str, Any]:
    """Median seconds of forward + backward and of forward alone (no grad), bf16 autocast."""
    x = torch.randn(cfg.batch_size, cfg.seq_len, width, device=device, requires_grad=True)  # (B, L, D)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def call() -> Tensor:
        out = layer(x)
        return out[0] if isinstance(out, tuple) else out

    def train_step() -> None:
        with autocast:
            y = call()
        y.float().sum().backward()

    def forward() -> None:
        with torch.no_grad(), autocast:
            call()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fwd_bwd = median(time_cuda(train_step, cfg.warmup, cfg.repeat))
    fwd = median(time_cuda(forward, cfg.warmup, cfg.repeat))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"forward_backward_ms": fwd_bwd * 1e3, "forward_ms": fwd * 1e3, "peak_gib": peak}


def _layers(cfg: SSMBenchConfig) -> dict[str, Callable[[], nn.Module]]:
    base = HorizonConfig.preset(cfg.preset)
    rows: dict[str, Callable[[], nn.Module]] = {"linear_DxD": lambda: nn.Linear(base.d_model, base.d_model)}
    for t in parse_ints(cfg.chunks):
        rows[f"s4d_gated_T{t}"] = lambda t=t: SSMSublayer(HorizonConfig.preset(cfg.preset, ssm_chunk=t,
                                                                             ssm_recompute=False))
    rows["s4d_gated_T128_recompute"] = lambda: SSMSublayer(HorizonConfig.preset(cfg.preset, ssm_chunk=128,
                                                                                          ssm_recompute=True))
    rows["s4d_ungated_T128"] = lambda: SSMSublayer(HorizonConfig.preset(cfg.preset, ssm_gate="none", ssm_chunk=128,
                                                                        ssm_recompute=False))
    for t in parse_ints(cfg.chunks):
        rows[f"selective_gated_T{t}"] = lambda t=t: SSMSublayer(HorizonConfig.preset(
            cfg.preset, ssm_kind="selective", ssm_chunk=t, ssm_recompute=False))
    rows["multires_conv"] = lambda: MultiResConv(base.d_model, base.conv_kernel, base.conv_levels)
    return rows


def run_ssm_bench(cfg: SSMBenchConfig) -> dict[str, Any]:
    out = refuse_existing(cfg.out, cfg.overwrite)
    device = resolve_device(cfg.device)
    width = HorizonConfig.preset(cfg.preset).d_model
    results: dict[str, Any] = {"environment": environment(), "config": asdict(cfg), "checks": {}, "layers": {}}
    results["checks"]["chunk_scan_vs_twin_float32"] = check_chunk_scan(device)
    results["checks"]["s4d_float32_vs_float64_recurrence"] = check_s4d(device, torch.float32)
    results["checks"]["s4d_bf16_products_vs_float64_recurrence"] = check_s4d(device, torch.bfloat16)
    results["checks"]["selective_float32_vs_float64_recurrence"] = check_ssd(device, torch.float32)
    results["checks"]["selective_bf16_vs_float64_recurrence"] = check_ssd(device, torch.bfloat16)
    for name, values in results["checks"].items():
        print(name, {k: f"{v:.1e}" for k, v in values.items()}, flush=True)
    for name, make in _layers(cfg).items():
        layer = make().to(device)
        try:
            row = _time_layer(layer, cfg, device, width)
        except torch.OutOfMemoryError as err:
            row = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        row["parameters"] = sum(p.numel() for p in layer.parameters())
        results["layers"][name] = row
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        del layer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    atomic_write_json(out, results)
    return results
