"""Turning a ``device`` setting (auto, cpu, cuda) into a torch device, and reading the autocast
dtype in force, in one place."""

from __future__ import annotations

import torch

from horizonlm.errors import HorizonError


def resolve_device(name: str, index: int | None = None) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a clear error.
    ``index`` selects the GPU (the local rank under torchrun)."""
    kind = name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise HorizonError("device cuda was asked for, but no CUDA device is available")
        return torch.device("cuda", index) if index is not None else torch.device("cuda")
    return torch.device(kind)


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype in force on ``device`` (a device or its type), or None outside autocast.
    Kernels that turn autocast off to keep their states in float32 use it to give their large
    products the dtype autocast would have chosen."""
    kind = device if isinstance(device, str) else device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
