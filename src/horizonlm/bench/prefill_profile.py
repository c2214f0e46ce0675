"""Where one prefill window's time goes: per module kind its device time, and the kernels that
take the most.

The prefill goal (1M tokens in 1 s) is missed with the matmuls at about a sixth of their ceiling
(RESULTS 3.2), so the question is which parts of a window take the rest. Two views of the same
window, after the memory has filled: (1) CUDA events around every call of the modules named below
(each block's sublayers by their attribute name, the model's embedding, memory, supervisor, norm
and head), summed per name; the names nest nowhere in HorizonLM's forward, so their sum against
the window's own time is what runs outside them (residual adds, casts, the chunk bookkeeping);
(2) ``torch.profiler``'s device time per kernel name, the largest first.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

TOP_KERNELS = 25
"""How many kernel names, by device time, the profile keeps."""


def timed_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules timed per name: each block's direct children by attribute name (``ssm``,
    ``conv``, ``mlp``, their norms), and the model's other direct children (blocks excluded)."""
    named: dict[str, list[nn.Module]] = defaultdict(list)
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                for sub_name, sub in block.named_children():
                    named[f"block.{sub_name}"].append(sub)
        else:
            named[name].append(child)
    return dict(named)


def module_device_ms(model: nn.Module, run: Any, device: torch.device) -> dict[str, float]:
    """Device milliseconds per name of :func:`timed_modules` over one call of ``run``, with CUDA
    events recorded before and after each module call, and the whole call's as ``total``."""
    marks: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
    open_events: dict[int, list[torch.cuda.Event]] = defaultdict(list)
    handles = []

    def before(module: nn.Module, *_: Any) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        open_events[id(module)].append(event)

    def after(name: str):
        def hook(module: nn.Module, *_: Any) -> None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append((name, open_events[id(module)].pop(), event))
        return hook

    for name, modules in timed_modules(model).items():
        for module in modules:
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after(name)))
    try:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize(device)
    finally:
        for handle in handles:
            handle.remove()
    out: dict[str, float] = defaultdict(float)
    for name, a, b in marks:
        out[name] += a.elapsed_time(b)
    result = dict(sorted(out.items(), key=lambda kv: -kv[1]))
    result["total"] = start.elapsed_time(end)
    result["outside_named_modules"] = result["total"] - sum(out.values())
    return result


def top_kernels(run: Any, device: torch.device, top: int = TOP_KERNELS) -> dict[str, Any]:
    """Device time per kernel name over one call of ``run`` (``torch.profiler``), the ``top``
    largest, with their call counts, and the sum over every kernel (device events only: the
    operators' own rows, which carry their kernels' device time again, are left out); and the
    ``top`` CUDA runtime calls by the host's time in them (``runtime_host``)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize(device)
    averages = prof.key_averages()  # aggregated once: it walks every event of the trace
    rows = []
    for event in averages:
        ms = getattr(event, "self_device_time_total", 0.0) / 1000
        if ms > 0 and event.device_type != DeviceType.CPU:  # kernels only: an operator's row repeats its kernels
            rows.append({"name": event.key[:100], "calls": event.count, "device_ms": ms})
    rows.sort(key=lambda r: -r["device_ms"])
    # The host's time inside CUDA runtime calls: where a step waits for the device (a synchronize,
    # a copy back to the host) or for the allocator (cudaMalloc / cudaFree), which device times miss.
    runtime = [{"name": event.key[:100], "calls": event.count, "host_ms": event.self_cpu_time_total / 1000}
               for event in averages
               if event.device_type == DeviceType.CPU and event.key.startswith("cuda")]
    runtime.sort(key=lambda r: -r["host_ms"])
    return {"kernels_device_ms": sum(r["device_ms"] for r in rows), "kernel_names": len(rows), "top": rows[:top],
            "runtime_host": runtime[:top]}
