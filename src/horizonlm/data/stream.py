"""Memory-mapped token streams and the long-stream window order used for training.

``B`` parallel streams each read a contiguous slice of the split; step ``i`` gives every stream
its next window of ``L`` tokens (plus one target). The order is a pure function of the step, so
a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from horizonlm.data.episodes import cloze, draw_episode, longest_fact
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
    """Recall episodes written into the training stream (generated, :mod:`horizonlm.data.episodes`).

    Each stream's windows are grouped in episodes of ``every`` windows. With probability
    ``rate`` an episode states 1 to ``max_keys`` labelled facts (phrasing, labels and values
    drawn from the training grammar, never the benchmark's sentences or the held-out phrasings)
    and asks for every one of them, in a random order, at the end of its last window, each
    answer a target (so a window of four facts teaches four lookups for the bytes of one). With
    probability ``same_window`` the facts are stated in the question's own window: only there
    does writing the memory get a gradient, because entries carried from earlier windows are
    detached. Otherwise they are stated in an earlier window, so the fact can only travel
    through the carried state (memory, supervisor, S4D). Everything is a pure function of
    (seed, stream, episode), so resumed runs see the same data.
    """

    every: int
    """Windows per episode; the question ends the last one."""
    rate: float
    """Probability that an episode carries facts and a question."""
    seed: int = 0
    """Seed of facts, labels and places (with the stream and episode index)."""
    answer_weight: float = 1.0
    """Loss weight of the answer's targets."""
    same_window: float = 0.0
    """Probability that the facts are stated in the question's window."""
    max_keys: int = 1
    """Facts per episode are drawn from 1..max_keys."""
    cloze: float = 0.0
    """Probability that a fact is asked with a cloze question (its own words before the value,
    :func:`horizonlm.data.episodes.cloze`) instead of a drawn one; drawn from a seed of its own,
    so the facts, their places and their order are those of the same mix without it."""

    def longest(self) -> int:
        """Bytes the facts and the question can take in one window."""
        return longest_fact(self.max_keys, cloze=self.cloze > 0)

    def apply(self, window: np.ndarray, stream: int, index: int) -> np.ndarray | None:
        """Edit ``window`` (L+1 tokens) in place; returns per-target loss weights (L,) or None."""
        episode, step = divmod(index, self.every)
        rng = random.Random(f"{self.seed}-{stream}-{episode}")
        if rng.random() >= self.rate:
            return None
        facts, _ = draw_episode(rng, rng.randint(1, self.max_keys))
        if self.cloze:  # a stream of its own: the facts, their places and order stay as without it
            asking = random.Random(f"{self.seed}-{stream}-{episode}-cloze")
            facts = [cloze(asking, fact) if asking.random() < self.cloze else fact for fact in facts]
        same = self.every == 1 or rng.random() < self.same_window
        fact_step = self.every - 1 if same else rng.randrange(self.every - 1)
        asked = [facts[i] for i in rng.sample(range(len(facts)), len(facts))]  # every fact, in a random order
        parts = [f"{fact.question} {fact.value}.".encode() for fact in asked]
        ask = b"".join(parts)
        stated = [fact.statement.encode() for fact in facts]
        length = len(window)
        room = length - (len(ask) if same else 0) - sum(map(len, stated))
        offsets = sorted(rng.randint(0, room) for _ in stated)  # gaps between facts, in order
        if step == fact_step:
            at = 0
            for offset, fact in zip(offsets, stated):
                start = offset + at
                window[start : start + len(fact)] = np.frombuffer(fact, dtype=np.uint8)
                at += len(fact)
        if step != self.every - 1:
            return None
        window[length - len(ask) :] = np.frombuffer(ask, dtype=np.uint8)
        weights = np.ones(length - 1, dtype=np.float32)
        end = length - len(ask)  # where the first question starts, then each part's end
        for fact, part in zip(asked, parts):
            end += len(part)
            answer = len(f" {fact.value}.")
            weights[end - 1 - answer : end - 1] = self.answer_weight  # the targets " 48213." after its question
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
        if self.retrieval is not None and self.retrieval.longest() > self.seq_len:
            raise HorizonError(f"seq_len={self.seq_len} is too short for {self.retrieval.max_keys} recall fact(s) "
                               f"and their questions ({self.retrieval.longest()} tokens)")
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
