"""What one decode step is made of: kernels launched, their summed device time, and the wall time,
for the steps that replay a graph and for the chunk-end steps that run eagerly.

The decode goal (2 ms a token at batch 1) is a question of how a step spends its time: a step
whose kernels add up to far less than its wall time waits on launches and the host, one whose
kernels fill it is bound by the kernels themselves. ``torch.profiler`` sees both; each step is
wrapped in a ``record_function`` range named after how it runs, and every device kernel that
starts inside a range is counted against it. On a CPU there are no device kernels and the counts
are of CPU operators (a smoke test of the bookkeeping, not a measurement).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from horizonlm.decode import GraphedDecoder
from horizonlm.state import HorizonState

STEP_KINDS = ("replay", "eager")
"""How a step runs: a replay (a CUDA graph on a GPU) or eagerly (a chunk end)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_decode(model: nn.Module, state: HorizonState, steps: int, bf16: bool = True) -> dict[str, Any]:
    """Profile ``steps`` graphed decode steps of ``model`` from ``state`` (after one chunk of
    unprofiled steps, so the graph in use is captured before the window). Per step kind: steps,
    median wall ms, and per step the kernels (device kernels on a GPU, CPU operators on a CPU)
    and their summed time in ms."""
    device = model.embed.weight.device
    decoder = GraphedDecoder(model, state, bf16=bf16)
    chunk = model.config.chunk_size
    token = torch.zeros(state.batch_size, 1, dtype=torch.long, device=device)  # (B, 1)
    for _ in range(chunk):  # a capture and a chunk end before the profiled steps
        decoder.step(token)
    walls: dict[str, list[float]] = {kind: [] for kind in STEP_KINDS}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            kind = "eager" if (decoder.state.pos + 1) % chunk == 0 or not decoder.replays else "replay"
            _sync(device)
            start = time.perf_counter()
            with record_function(f"decode_step_{kind}"):
                decoder.step(token)
                _sync(device)
            walls[kind].append(time.perf_counter() - start)
    return {kind: _summary(prof, kind, walls[kind], device) for kind in STEP_KINDS if walls[kind]}


def _summary(prof: profile, kind: str, walls: list[float], device: torch.device) -> dict[str, Any]:
    """The kernels that started inside this kind's step ranges, per step."""
    events = prof.events()
    ranges = [(e.time_range.start, e.time_range.end) for e in events if e.name == f"decode_step_{kind}"]
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        kernels = [e for e in events if e.name.startswith("aten::")
                   and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]  # outermost operators
    per_step = [[e for e in kernels if lo <= e.time_range.start <= hi] for lo, hi in ranges]
    return {"steps": len(ranges), "median_wall_ms": 1000 * statistics.median(walls),
            "kernels_per_step": statistics.median(len(k) for k in per_step),
            "kernel_ms_per_step": statistics.median(sum(e.time_range.elapsed_us() for e in k) / 1000
                                                    for k in per_step),
            "counted": "device kernels" if device.type == "cuda" else "outermost CPU operators",
            "statistic": "median over steps (a replayed step that captures its chunk's graph runs warm-ups)"}
