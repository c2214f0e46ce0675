"""``horizon ingest``: stream files through a model into a saved context, resumably.

Files are read in windows of bytes and fed with the state carried; every ``save_every`` tokens
the context is saved with how far each file was read, so an interrupted ingest resumes where
its last save stopped, and a finished context can be appended to later.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from horizonlm.checkpoint import load_checkpoint
from horizonlm.context import (
    load_context,
    model_fingerprint,
    read_manifest,
    save_context,
)
from horizonlm.data.tokenizers import require_byte_level
from horizonlm.devices import resolve_device
from horizonlm.errors import HorizonError
from horizonlm.memory.store import StoreConfig
from horizonlm.model import HorizonLM
from horizonlm.progress import show_bars
from horizonlm.state import HorizonState


@dataclass
class IngestConfig:
    """Settings of ``horizon ingest``."""

    checkpoint: str = "runs/shakespeare"
    """Checkpoint folder (an exported one too), or a run folder for the checkpoint its
    checkpoints/latest names (RUN/checkpoints/best: the best-validated one)."""
    context: str = "runs/context"
    """Saved-context folder: created, resumed or appended to."""
    backend: str = "torch"
    """Memory store backend for a new context (torch, faiss_flat, faiss_ivf_flat, faiss_ivf_pq, faiss_hnsw)."""
    capacity: int = 0
    """Memory entries kept for a new context: 0 keeps every entry (all visible to the model),
    otherwise the oldest are dropped beyond it (FIFO)."""
    window: int = 65536
    """Bytes fed per call."""
    save_every: int = 1_000_000
    """Save the context every this many tokens (and at the end)."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    bf16: bool = True
    """bf16 autocast on CUDA."""
    progress: bool | None = None
    """Show a progress bar (default: only when stderr is a terminal; ``--progress`` forces it)."""

    def __post_init__(self) -> None:
        if self.window < 1 or self.save_every < 1:
            raise ValueError("window and save_every must be >= 1")
        if self.capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {self.capacity}")
        StoreConfig(backend=self.backend)


def ingest(files: list[str], cfg: IngestConfig) -> dict[str, Any]:
    """Read ``files`` into the context; returns tokens read, seconds and tokens per second."""
    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(cfg.checkpoint)
    model = ckpt.model.to(device).eval()
    if not isinstance(model, HorizonLM):
        raise HorizonError("ingest needs a HorizonLM checkpoint")
    require_byte_level(ckpt.info.get("tokenizer", {}), f"ingest reads raw bytes; checkpoint {ckpt.path}")
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise HorizonError(f"{p} not found")
    fingerprint = model_fingerprint(model)
    context = Path(cfg.context)
    if (context / "manifest.json").is_file():
        state, manifest = load_context(context, model, device, fingerprint)
        done: dict[str, int] = dict(manifest.get("sources", {}))
    else:
        read_manifest_if_interrupted(context)
        store = StoreConfig(backend=cfg.backend, capacity=cfg.capacity, policy="fifo" if cfg.capacity else "keep_all")
        state = model.init_state(1, device, store_config=store)
        done = {}
    total = sum(max(0, p.stat().st_size - done.get(str(p.resolve()), 0)) for p in paths)
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=not show_bars(cfg.progress), desc="ingest")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.bf16)
    read, since_save, t0 = 0, 0, time.perf_counter()
    with torch.no_grad(), autocast:
        for path in paths:
            key = str(path.resolve())
            offset = done.get(key, 0)
            with open(path, "rb") as f:
                f.seek(offset)
                while block := f.read(cfg.window):
                    tokens = torch.frombuffer(bytearray(block), dtype=torch.uint8).to(device).long().unsqueeze(0)  # (1, T)
                    _, state = model(tokens, state)
                    offset += len(block)
                    done[key] = offset
                    read += len(block)
                    since_save += len(block)
                    bar.update(len(block))
                    if since_save >= cfg.save_every:
                        _save(context, model, state, done, fingerprint)
                        since_save = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    bar.close()
    _save(context, model, state, done, fingerprint)
    return {"tokens": read, "seconds": seconds, "tokens_per_s": read / seconds if seconds else 0.0,
            "position": state.pos, "memory_entries": len(state.memory.store)}


def read_manifest_if_interrupted(context: Path) -> None:
    """A folder without a manifest is only acceptable when it does not exist (or is empty)."""
    if context.exists() and any(context.iterdir()):
        read_manifest(context)


def _save(context: Path, model: HorizonLM, state: HorizonState, done: dict[str, int], fingerprint: str) -> None:
    save_context(context, model, state, extra={"sources": done}, fingerprint=fingerprint)
