"""``horizon eval``: stream a whole split (or text file) through the model with state carried.

Scores are totals first (nats over every predicted token), then converted: bits per byte
divides by the bytes the tokens stand for, word-level perplexity divides by the word count
(WikiText: words + one ``<eos>`` per line), so a byte model and a word model are compared on the
same text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from horizonlm.checkpoint import Checkpoint, carries_state, load_checkpoint
from horizonlm.data.stream import load_meta, open_split
from horizonlm.data.tokenizers import tokenizer_from_spec
from horizonlm.devices import resolve_device
from horizonlm.errors import HorizonError
from horizonlm.fileio import existing_file, not_text
from horizonlm.progress import show_bars

SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class EvalConfig:
    """Settings of ``horizon eval``."""

    checkpoint: str = "runs/shakespeare"
    """Checkpoint folder (an exported one too), or a run folder for the checkpoint its
    checkpoints/latest names (RUN/checkpoints/best: the best-validated one)."""
    data: str = ""
    """Prepared data folder to score (default: the data the checkpoint was trained on; other data
    is scored with a warning)."""
    split: str = "test"
    """Split of the data to score: train, valid or test."""
    text: str = ""
    """Score this text file instead of a prepared split (raw bytes for a byte-level model)."""
    wikitext_words: bool = False
    """Also report word-level perplexity of ``text`` (words + one <eos> per line, as WikiText counts)."""
    window: int = 4096
    """Tokens per call; the state is carried from one window to the next."""
    reset_every: int = 0
    """Start from a fresh state every this many tokens, a multiple of ``window`` (0: never)."""
    max_tokens: int = 0
    """Score at most this many tokens from the start (0: all of them)."""
    device: str = "auto"
    """``auto`` (CUDA if present), ``cpu`` or ``cuda``."""
    progress: bool | None = None
    """Show a progress bar (default: only when stderr is a terminal, so piped output holds no
    escape codes; ``--progress`` forces it)."""

    def __post_init__(self) -> None:
        if self.split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {', '.join(SPLIT_NAMES)}, got {self.split!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be one of auto, cpu, cuda, got {self.device!r}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        for name in ("reset_every", "max_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.reset_every % self.window:
            raise ValueError(f"reset_every must be a multiple of window ({self.window}), got {self.reset_every}")
        if self.data and self.text:
            raise ValueError("text: give either a text file to score or `data` (a prepared split), not both")
        if self.wikitext_words and (not self.text or self.max_tokens):
            raise ValueError("wikitext_words counts the words of a whole text file: give the file with `text`, "
                             "and no max_tokens")


def _window_nats(model: nn.Module, chunk: np.ndarray, state: Any, carry: bool, device: torch.device,
                 bf16: bool) -> tuple[Tensor, Any]:
    """One window of each stream in a batch: ``chunk`` (B, T+1) token ids, the inputs and their
    next tokens. Returns every prediction's loss in nats (B, T) and the state to carry (None for
    a model that restarts every window)."""
    chunk = torch.from_numpy(np.asarray(chunk, dtype=np.int64))  # (B, T+1)
    x, y = chunk[:, :-1].to(device), chunk[:, 1:].to(device)  # (B, T)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and bf16):
        logits, new_state = model(x, state if carry else None)  # (B, T, V)
    nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(x.shape)  # (B, T)
    return nats, (new_state if carry else None)


@torch.no_grad()
def evaluate_tokens(model: nn.Module, tokens: np.ndarray, window: int, device: torch.device | str,
                    bytes_per_token: float = 1.0, max_tokens: int | None = None, reset_every: int | None = None,
                    bf16: bool = True, progress: bool | None = True, keep_per_token: bool = False,
                    desc: str = "eval", until: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Next-token loss over ``tokens`` as one stream, fed in windows of ``window`` tokens.

    HorizonLM (and a peer that carries its state) carries its state across windows (reset every
    ``reset_every`` tokens if given); the transformer restarts every window (its context is the
    window). With ``keep_per_token``, also returns every prediction's loss in nats
    (``per_token_nats``, a float32 array).
    ``until`` is asked after each window; when it says True the evaluation ends there (a stop
    request, a time budget) and the result has ``complete: False`` (with ``until``, always the key).
    ``progress`` None draws the bar only on a terminal.
    """
    device = torch.device(device)
    if reset_every is not None and reset_every % window != 0:
        raise ValueError(f"reset_every={reset_every} must be a multiple of window={window}")
    was_training = model.training
    model.eval()
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    carry = carries_state(model)
    total, count, state = 0.0, 0, None
    per_token = np.zeros(max(0, n - 1), dtype=np.float32) if keep_per_token else None
    starts = range(0, n - 1, window)
    complete = True
    for start in tqdm(starts, disable=not show_bars(progress), unit="win", desc=desc, leave=False,
                      dynamic_ncols=True):
        if reset_every is not None and start % reset_every == 0:
            state = None
        window_tokens = np.asarray(tokens[start : min(n, start + window + 1)])[None]  # (1, T+1)
        nats, state = _window_nats(model, window_tokens, state, carry, device, bf16)  # (1, T)
        losses = nats[0]  # (T,)
        total += losses.sum().item()
        count += losses.numel()
        if per_token is not None:
            per_token[start : start + losses.numel()] = losses.cpu().numpy()
        if until is not None and start + window < n - 1 and until():
            complete = False
            break
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
    if until is not None:
        result["complete"] = complete
    return result


@torch.no_grad()
def evaluate_streams(model: nn.Module, streams: Sequence[np.ndarray], window: int, device: torch.device | str,
                     batch: int = 16, bf16: bool = True) -> list[np.ndarray]:
    """Every prediction's loss (nats) in several independent streams, ``batch`` streams at a time.

    Each stream is scored as :func:`evaluate_tokens` scores one (a fresh state at its start, carried
    across its windows when the model carries state), but the streams of a batch share each call:
    streams of similar length are grouped and a shorter one is padded at its end, which no earlier
    prediction can see (causality), and its padded predictions are dropped. Returns, per stream in
    the order given, a float32 array of ``len(stream) - 1`` losses.
    """
    if window < 1 or batch < 1:
        raise ValueError(f"window and batch must be >= 1, got {window}, {batch}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    carry = carries_state(model)
    losses = [np.zeros(max(0, len(s) - 1), dtype=np.float32) for s in streams]
    order = sorted(range(len(streams)), key=lambda i: -len(streams[i]))  # similar lengths share a batch
    for group in (order[g : g + batch] for g in range(0, len(order), batch)):
        longest = len(streams[group[0]])
        padded = np.zeros((len(group), longest), dtype=np.int64)  # (B, N)
        for row, i in enumerate(group):
            padded[row, : len(streams[i])] = streams[i]
        state = None
        for start in range(0, longest - 1, window):
            nats, state = _window_nats(model, padded[:, start : start + window + 1], state, carry, device, bf16)
            nats = nats.cpu().numpy()  # (B, T)
            for row, i in enumerate(group):
                keep = min(nats.shape[1], len(losses[i]) - start)
                if keep > 0:
                    losses[i][start : start + keep] = nats[row, :keep]
    if was_training:
        model.train()
    return losses


def word_perplexity(total_nats: float, words: int) -> float:
    """Per-word perplexity from a total loss over the same text, whatever the tokenizer."""
    return math.exp(total_nats / words)


def wikitext_word_count(text: str) -> int:
    """Words plus one ``<eos>`` per line, the WikiText convention."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return sum(len(line.split()) for line in lines) + len(lines)


def run_eval(cfg: EvalConfig, warn: Callable[[str], None]) -> dict[str, Any]:
    """Score a checkpoint on a prepared split (by default of its own training data) or on a text
    file; returns the report. ``warn`` receives what the user should know (other data)."""
    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(cfg.checkpoint)
    model = ckpt.model.to(device)
    report: dict[str, Any] = {"checkpoint": str(ckpt.path)}
    if cfg.text:
        return {**report, **_eval_text(cfg, ckpt, model, device, warn)}
    data, meta = _eval_data(cfg, ckpt, warn)
    tokens = open_split(data, cfg.split, verify=True)
    info = meta["splits"][cfg.split]
    result = evaluate_tokens(model, tokens, cfg.window, device, bytes_per_token=info["bytes"] / info["tokens"],
                             max_tokens=cfg.max_tokens or None, reset_every=cfg.reset_every or None,
                             progress=cfg.progress)
    report.update(source=f"{data}:{cfg.split}", **result, split_tokens=len(tokens) - 1)
    if meta["tokenizer"]["kind"] == "word":
        report["word_perplexity"] = word_perplexity(result["total_nats"], result["tokens"])
    return report


def _eval_data(cfg: EvalConfig, ckpt: Checkpoint, warn: Callable[[str], None]) -> tuple[str, dict[str, Any]]:
    """The data folder to score and its meta.json: ``cfg.data``, else the data the checkpoint was
    trained on. Data with another tokenizer is refused; data whose split differs from the training
    data's is scored with a warning."""
    trained = ckpt.info.get("data") or (ckpt.info.get("train_config") or {}).get("data")
    data = cfg.data or trained
    if not data:
        raise HorizonError(f"checkpoint {ckpt.path} does not record the data it was trained on; give it with --data")
    if not cfg.data and not Path(data, "meta.json").is_file():
        raise HorizonError(f"the checkpoint was trained on {data}, which is not prepared there now; "
                           "give the data to score with --data")
    meta = load_meta(data)
    if meta["tokenizer"] != ckpt.info.get("tokenizer", meta["tokenizer"]):
        raise HorizonError(f"--data {data} is {meta['tokenizer'].get('kind')}-level tokens, the checkpoint reads "
                           f"{ckpt.info['tokenizer'].get('kind')}-level ones (or another vocabulary): its scores "
                           "would mean nothing")
    recorded = (ckpt.info.get("data_meta_sha") or {}).get(cfg.split)
    current = meta["splits"].get(cfg.split, {}).get("sha256")
    if "data_meta_sha" not in ckpt.info:
        warn(f"checkpoint {ckpt.path} does not record the sha256 of its data; cannot check that {data} is it")
    elif recorded != current:
        warn(f"{data} is not the data this model was trained on ({trained}): its {cfg.split} split differs. "
             "The score is not comparable with the run's own validation")
    return data, meta


def _eval_text(cfg: EvalConfig, ckpt: Checkpoint, model: nn.Module, device: torch.device,
               warn: Callable[[str], None]) -> dict[str, Any]:
    path = existing_file(cfg.text, "--text")
    spec = ckpt.info.get("tokenizer", {"kind": "byte"})
    problem = not_text(path)
    if problem and spec.get("kind") != "byte":
        raise HorizonError(f"--text {path} is not UTF-8 text ({problem}); a {spec.get('kind')}-level model reads text")
    if problem:
        warn(f"--text {path} does not look like text ({problem}); scoring its raw bytes")
    raw = path.read_bytes()
    if spec.get("kind") == "byte":
        ids = np.frombuffer(raw, dtype=np.uint8)
    else:
        ids = np.asarray(tokenizer_from_spec(spec).encode(raw.decode("utf-8")), dtype=np.int64)
    if len(ids) < 2:
        raise HorizonError(f"--text {path} holds {len(ids)} token(s): nothing to score (a score needs 2)")
    result = evaluate_tokens(model, ids, cfg.window, device, bytes_per_token=len(raw) / max(1, len(ids)),
                             max_tokens=cfg.max_tokens or None, reset_every=cfg.reset_every or None,
                             progress=cfg.progress)
    report = {"source": str(path), **result}
    if cfg.wikitext_words:
        words = wikitext_word_count(raw.decode("utf-8", errors="replace"))
        report.update(words=words, word_perplexity=word_perplexity(result["total_nats"], words))
    return report
