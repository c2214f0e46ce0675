"""``horizon generate``: streaming sampling at constant memory per step.

The prompt is fed in windows with the state carried (a prompt of any length never becomes one
tensor of its full length), then one token at a time is sampled and fed back.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from horizonlm.data.tokenizers import ByteTokenizer, Tokenizer
from horizonlm.decode import GraphedDecoder
from horizonlm.errors import HorizonError
from horizonlm.fileio import existing_file, not_text
from horizonlm.model import HorizonLM


@dataclass
class GenerateConfig:
    """Settings of ``horizon generate``."""

    checkpoint: str = "runs/shakespeare"
    """Checkpoint folder (an exported one too), or a run folder for the checkpoint its
    checkpoints/latest names (RUN/checkpoints/best: the best-validated one)."""
    prompt: str = ""
    """Prompt text, echoed before the sample."""
    prompt_file: str = ""
    """Read the prompt from this file instead, of any length, in windows (echoed too)."""
    tokens: int = 400
    """Tokens to sample."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches p."""
    seed: int = 0
    """Seed of the sampler."""
    window: int = 4096
    """Prompt tokens fed per call."""
    context: str = ""
    """Continue from this saved context (``horizon ingest``) instead of an empty stream."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""

    def __post_init__(self) -> None:
        for name in ("tokens", "top_k", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be one of auto, cpu, cuda, got {self.device!r}")
        if self.prompt and self.prompt_file:
            raise ValueError("prompt_file: give the prompt as text or as a file, not both")


def sample_next(logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> Tensor:
    """One token per row of ``logits`` (B, V) -> (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    scores = logits.float() / temperature  # (B, V)
    if top_k > 0:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))  # (B, V)
    if top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_scores.softmax(dim=-1)  # (B, V)
        drop = probs.cumsum(dim=-1) - probs > top_p  # (B, V): mass before this token already reaches p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))  # (B, V)
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)  # (B, V)
    probs = scores.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)  # (B,)


def check_prompt(cfg: GenerateConfig, tokenizer: Tokenizer, warn: Callable[[str], None]) -> None:
    """Refuse an empty prompt (it would generate unconditioned text) unless a saved context
    precedes it, and a prompt file that is not text for a word or BPE model; for a byte-level
    model such a file is fed as raw bytes, with a warning."""
    if cfg.prompt_file:
        path = existing_file(cfg.prompt_file, "--prompt-file")
        if path.stat().st_size == 0:
            raise HorizonError(f"--prompt-file {path} is empty; give a prompt to continue")
        problem = not_text(path)
        if problem and not isinstance(tokenizer, ByteTokenizer):
            raise HorizonError(f"--prompt-file {path} is not UTF-8 text ({problem}); this model reads text")
        if problem:
            warn(f"--prompt-file {path} does not look like text ({problem}); feeding its raw bytes")
    elif not cfg.prompt and not cfg.context:
        raise HorizonError("give a prompt with --prompt TEXT or --prompt-file FILE (or continue a saved --context); "
                           "an empty prompt would generate unconditioned text")


def prompt_windows(tokenizer: Tokenizer, text: str | None, path: str | None,
                   window: int) -> Iterator[tuple[list[int], str]]:
    """Prompt token ids in windows, each with the text it stands for (to echo it); a byte-level
    prompt file is read block by block."""
    if path:
        file = existing_file(path, "--prompt-file")
        if isinstance(tokenizer, ByteTokenizer):
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            with open(file, "rb") as f:
                while block := f.read(window):
                    yield list(block), decoder.decode(block)
            yield [], decoder.decode(b"", final=True)
            return
        text = file.read_text(encoding="utf-8", errors="strict")
    ids = tokenizer.encode(text or "")
    for start in range(0, len(ids), window):
        yield ids[start : start + window], text if start == 0 else ""


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Tokenizer, cfg: GenerateConfig, device: torch.device,
             emit: Callable[[str], None] = lambda s: None, state=None) -> list[int]:
    """Feed the prompt (after ``state``, if given), echoing it through ``emit``, then sample
    ``cfg.tokens`` tokens, calling ``emit`` with text as it comes."""
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    last_logits = None
    for ids, text in prompt_windows(tokenizer, cfg.prompt, cfg.prompt_file or None, cfg.window):
        emit(text)
        if not ids:
            continue
        x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
        logits, state = model(x, state)  # (1, T, V)
        last_logits = logits[:, -1]  # (1, V)
    if last_logits is None:  # empty prompt after a saved context: go on from a newline
        start = tokenizer.encode("\n") or [0]
        logits, state = model(torch.tensor([start[-1:]], device=device), state)  # (1, 1, V)
        last_logits = logits[:, -1]  # (1, V)
    text = codecs.getincrementaldecoder("utf-8")(errors="replace") if isinstance(tokenizer, ByteTokenizer) else None
    # HorizonLM replays CUDA graphs on a GPU (one for every in-chunk step and one for chunk ends, a
    # filling memory padded to its full size; the steps replay without graphs elsewhere); the
    # baseline's cache grows every step, so it steps eagerly.
    stepper = GraphedDecoder(model, state, bf16=False) if isinstance(model, HorizonLM) else None
    out: list[int] = []
    for _ in range(cfg.tokens):
        token = sample_next(last_logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)  # (1,)
        out.append(int(token))
        emit(text.decode(bytes([int(token)])) if text else tokenizer.decode([int(token)]) + " ")
        if stepper is not None:
            last_logits = stepper.step(token.view(1, 1))  # (1, V)
        else:
            logits, state = model(token.view(1, 1), state)  # (1, 1, V)
            last_logits = logits[:, -1]  # (1, V)
    if text:
        emit(text.decode(b"", final=True))
    return out
