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
class RetrievalMix:
    """Passkey episodes written into the training stream, so retrieval must cross windows.

    Each stream's windows are grouped in episodes of ``every`` windows. With probability
    ``rate`` an episode states a random 5-digit key once in its first window and asks for it
    at the end of its last window, with the answer as the target; the key can only travel
    through the carried state (supervisor, memory, S4D). Everything is a pure function of
    (seed, stream, episode), so resumed runs see the same data.
    """

    every: int
    rate: float
    seed: int = 0
    answer_weight: float = 1.0

    def apply(self, window: np.ndarray, stream: int, index: int) -> np.ndarray | None:
        """Edit ``window`` (L+1 tokens) in place; returns per-target loss weights (L,) or None."""
        episode, step = divmod(index, self.every)
        rng = np.random.default_rng([self.seed, stream, episode])
        if rng.random() >= self.rate:
            return None
        key = int(rng.integers(10000, 100000))
        fact = f" The pass key is {key}. Remember it. {key} is the pass key. ".encode()
        ask = f" What is the pass key? The pass key is {key}.".encode()
        length = len(window)
        at = int(rng.integers(0, max(1, length - len(fact) - len(ask))))
        weights = None
        if step == 0:
            window[at : at + len(fact)] = np.frombuffer(fact, dtype=np.uint8)
        if step == self.every - 1:
            window[length - len(ask) :] = np.frombuffer(ask, dtype=np.uint8)
            weights = np.ones(length - 1, dtype=np.float32)
            weights[length - 1 - 7 : length - 1] = self.answer_weight  # targets " 48213." after "is"
        return weights


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
    retrieval: RetrievalMix | None = None

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

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs, targets and per-target loss weights (None when uniform) for ``step``:
        (local_batch, seq_len) tensors."""
        w = step % self.windows
        rows, weights = [], []
        for b in range(self.first_stream, self.first_stream + self.local_batch):
            start = b * self.stream_len + w * self.seq_len
            row = np.array(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)  # (L+1,)
            weight = self.retrieval.apply(row, b, w) if self.retrieval is not None else None
            rows.append(row)
            weights.append(np.ones(self.seq_len, dtype=np.float32) if weight is None else weight)
        window = torch.from_numpy(np.stack(rows))  # (B, L+1)
        weight = torch.from_numpy(np.stack(weights)) if self.retrieval is not None else None  # (B, L)
        return window[:, :-1], window[:, 1:], weight  # (B, L), (B, L), (B, L) | None
