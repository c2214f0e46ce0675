"""``horizon eval``: stream a whole split (or text file) through the model with state carried.

Scores are totals first (nats over every predicted token), then converted: bits per byte
divides by the bytes the tokens stand for, word-level perplexity divides by the word count
(WikiText: words + one ``<eos>`` per line), so a byte model and a word model are compared on the
same text.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from horizonlm.model import HorizonLM


@torch.no_grad()
def evaluate_tokens(model: nn.Module, tokens: np.ndarray, window: int, device: torch.device | str,
                    bytes_per_token: float = 1.0, max_tokens: int | None = None, reset_every: int | None = None,
                    bf16: bool = True, progress: bool = True, keep_per_token: bool = False) -> dict[str, Any]:
    """Next-token loss over ``tokens`` as one stream, fed in windows of ``window`` tokens.

    HorizonLM carries its state across windows (reset every ``reset_every`` tokens if given);
    the transformer restarts every window (its context is the window). With ``keep_per_token``,
    also returns every prediction's loss in nats (``per_token_nats``, a float32 array).
    """
    device = torch.device(device)
    if reset_every is not None and reset_every % window != 0:
        raise ValueError(f"reset_every={reset_every} must be a multiple of window={window}")
    was_training = model.training
    model.eval()
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    carry = isinstance(model, HorizonLM)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and bf16)
    total, count, state = 0.0, 0, None
    per_token = np.zeros(max(0, n - 1), dtype=np.float32) if keep_per_token else None
    starts = range(0, n - 1, window)
    for start in tqdm(starts, disable=not progress, unit="win", desc="eval"):
        if reset_every is not None and start % reset_every == 0:
            state = None
        chunk = torch.from_numpy(np.asarray(tokens[start : min(n, start + window + 1)], dtype=np.int64))  # (T+1,)
        x, y = chunk[:-1].unsqueeze(0).to(device), chunk[1:].unsqueeze(0).to(device)  # (1, T)
        with autocast:
            logits, new_state = model(x, state if carry else None)  # (1, T, V)
        losses = F.cross_entropy(logits.float()[0], y[0], reduction="none")  # (T,)
        total += losses.sum().item()
        count += losses.numel()
        if per_token is not None:
            per_token[start : start + losses.numel()] = losses.cpu().numpy()
        state = new_state if carry else None
    if was_training:
        model.train()
    if count == 0:
        raise ValueError("nothing to evaluate: the stream has fewer than 2 tokens")
    result: dict[str, Any] = {
        "tokens": count,
        "total_nats": total,
        "nats_per_token": total / count,
        "bits_per_byte": total / math.log(2) / (count * bytes_per_token),
    }
    if per_token is not None:
        result["per_token_nats"] = per_token
    return result


def word_perplexity(total_nats: float, words: int) -> float:
    """Per-word perplexity from a total loss over the same text, whatever the tokenizer."""
    return math.exp(total_nats / words)


def wikitext_word_count(text: str) -> int:
    """Words plus one ``<eos>`` per line, the WikiText convention."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return sum(len(line.split()) for line in lines) + len(lines)
