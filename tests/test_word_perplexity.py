"""Word-level perplexity against cases worked out by hand (not with the code's own formula)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from horizonlm.evaluate import evaluate_tokens, wikitext_word_count, word_perplexity

WIKITEXT = " a b c \n \n d e \n"
"""16 bytes, three lines: 3 + 0 + 2 = 5 words and 3 <eos>, 8 in all."""


class FixedDistribution(nn.Module):
    """Predicts the same next-byte distribution whatever it reads (log-probabilities as logits)."""

    def __init__(self, probs: dict[int, float]) -> None:
        super().__init__()
        logits = torch.full((256,), float("-inf"))  # (V,)
        for byte, p in probs.items():
            logits[byte] = math.log(p)
        self.register_buffer("logits", logits)

    def forward(self, tokens: torch.Tensor, state=None):
        return self.logits.expand(*tokens.shape, 256), None  # (B, L, V)


def _score(model: nn.Module, text: str, window: int) -> dict:
    ids = np.frombuffer(text.encode(), dtype=np.uint8)
    return evaluate_tokens(model, ids, window, "cpu", progress=False)


def test_wikitext_word_count_by_hand() -> None:
    assert wikitext_word_count(WIKITEXT) == 8
    assert wikitext_word_count("one two\nthree") == 3 + 2  # a last line without its newline counts too


@pytest.mark.parametrize("window", [1, 4, 100])
def test_uniform_bytes(window: int) -> None:
    """15 predictions at 1/256 each over 8 words: 256 ** (15/8) = 2 ** 15 per word."""
    result = _score(FixedDistribution({b: 1 / 256 for b in range(256)}), WIKITEXT, window)
    assert result["tokens"] == 15
    assert result["bits_per_byte"] == pytest.approx(8.0, rel=1e-6)
    assert word_perplexity(result["total_nats"], wikitext_word_count(WIKITEXT)) == pytest.approx(32768, rel=1e-5)


def test_uneven_distribution() -> None:
    """Text "a a\\n": predicted ' ' (1/2), 'a' (1/4), '\\n' (1/4): 1 + 2 + 2 = 5 bits over
    2 words + 1 <eos>, so perplexity 2 ** (5/3) per word and 5/3 bits per byte."""
    model = FixedDistribution({ord(" "): 0.5, ord("a"): 0.25, ord("\n"): 0.25})
    result = _score(model, "a a\n", window=2)
    assert result["total_nats"] == pytest.approx(5 * math.log(2), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(5 / 3, rel=1e-6)
    assert word_perplexity(result["total_nats"], wikitext_word_count("a a\n")) == pytest.approx(2 ** (5 / 3), rel=1e-6)
