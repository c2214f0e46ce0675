"""What every benchmark records beside its numbers, and a CUDA-event timer."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": os.environ.get("HORIZON_COMMIT") or _git_commit(),
        "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),  # the caching allocator's settings, if any
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["device_count"] = torch.cuda.device_count()
    else:
        info["device"] = "cpu"
    return info


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def time_cuda(fn: Callable[[], Any], warmup: int, repeat: int) -> list[float]:
    """Seconds per call of ``fn``, each timed with CUDA events (or perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``|got - want| / |want|`` in float64 (Frobenius norms): how the benchmarks' GPU checks
    compare a fast path with its reference."""
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300)).item()


def median(values: list[float]) -> float:
    return statistics.median(values)


def parse_ints(text: str) -> list[int]:
    """``"1024,4096"`` -> ``[1024, 4096]`` (the list-valued benchmark settings)."""
    return [int(x) for x in text.split(",") if x.strip()]


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure to ``path`` atomically and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
