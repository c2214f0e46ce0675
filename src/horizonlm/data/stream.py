"""Memory-mapped token streams and the long-stream window order used for training.

``B`` parallel streams each read a contiguous slice of the split; step ``i`` gives every stream
its next window of ``L`` tokens (plus one target). The order is a pure function of the step, so
a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from horizonlm.errors import HorizonError
from horizonlm.fileio import sha256_file


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise HorizonError(f"{path} not found: run `horizon prepare` first")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HorizonError(f"{path} is not valid JSON: {err}") from err
    for key in ("vocab_size", "dtype", "splits", "tokenizer"):
        if key not in meta:
            raise HorizonError(f"{path} lacks the field {key!r}")
    return meta


def open_split(data_dir: str | Path, split: str, verify: bool = False) -> np.memmap:
    """The split's tokens as a read-only memmap, checked against meta.json."""
    meta = load_meta(data_dir)
    if split not in meta["splits"]:
        raise HorizonError(f"split {split!r} not in {data_dir} (has {', '.join(meta['splits'])})")
    info = meta["splits"][split]
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise HorizonError(f"{path} not found")
    dtype = np.dtype(meta["dtype"])
    if path.stat().st_size != info["tokens"] * dtype.itemsize:
        raise HorizonError(f"{path} has {path.stat().st_size} bytes, meta.json promises {info['tokens']} tokens")
    if verify and sha256_file(path) != info["sha256"]:
        raise HorizonError(f"{path} does not match its sha256 in meta.json")
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass
class LongStreamBatcher:
    """Windows of ``seq_len`` tokens from ``batch_size`` contiguous streams over ``tokens``.

    Streams ``[first_stream, first_stream + local_batch)`` belong to this process (DDP ranks take
    disjoint streams of one global batch). When a stream runs out it starts over and the caller
    must reset its state: :meth:`starts_epoch` says when.
    """

    tokens: np.ndarray
    batch_size: int
    seq_len: int
    first_stream: int = 0
    local_batch: int | None = None

    def __post_init__(self) -> None:
        if self.local_batch is None:
            self.local_batch = self.batch_size
        self.stream_len = len(self.tokens) // self.batch_size
        self.windows = (self.stream_len - 1) // self.seq_len
        if self.windows < 1:
            raise HorizonError(
                f"{len(self.tokens)} tokens cannot fill {self.batch_size} streams of one window of "
                f"{self.seq_len} tokens; lower batch_size or seq_len")

    def starts_epoch(self, step: int) -> bool:
        return step % self.windows == 0

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets for ``step``: two (local_batch, seq_len) int64 tensors."""
        w = step % self.windows
        rows = []
        for b in range(self.first_stream, self.first_stream + self.local_batch):
            start = b * self.stream_len + w * self.seq_len
            rows.append(np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        window = torch.from_numpy(np.stack(rows))  # (B, L+1)
        return window[:, :-1], window[:, 1:]  # (B, L), (B, L)
