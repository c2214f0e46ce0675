"""Pure data of ``horizon bench recall``: multi-query associative recall (MQAR) sequences.

Rung 1 follows Zoology (arXiv 2312.04927): ``P`` key-value pairs at the start of a sequence of
``L`` tokens, keys and values drawn without replacement from disjoint halves of the vocabulary
(token 0 unused), then every key asked once at a query slot drawn with Zoology's power law
(queries mostly soon after the pairs). The target at a query position is the value bound to
its key; no other position has a target.

Rung 2 puts ``G`` tokens of filler between the pairs and the queries: ``[pairs: 2P][gap: G]
[queries: 2P]``, each query key followed by one filler token, the keys asked in random order.
Fed window by window, the pairs lie in the first window and the queries ``G`` tokens later.

One deliberate difference from Zoology: filler never contains a key of its own sequence
(Zoology's random filler does). At a gap of a million tokens every key would otherwise recur
thousands of times, bound to random successors, and "the value bound to the key" would lose
its meaning. Random filler is uniform over the vocabulary, a draw that hits one of the
sequence's keys redrawn from the value half (values in filler are harmless: a lookup goes from
key to value). Prose filler is byte-level text; its pairs use the bytes above ASCII (keys
128-191, values 192-255), which ASCII prose never contains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from horizonlm.errors import HorizonError

FILLERS = ("random", "prose")
SPLITS = {"train": 0, "valid": 1, "test": 2}


@dataclass(frozen=True)
class PairVocab:
    """Where keys and values come from: two disjoint half-open ranges of token ids."""

    key_lo: int
    """First key token."""
    key_hi: int
    """One past the last key token."""
    value_lo: int
    """First value token."""
    value_hi: int
    """One past the last value token."""

    @property
    def max_pairs(self) -> int:
        """Pairs a sequence can hold: keys and values are drawn without replacement."""
        return min(self.key_hi - self.key_lo, self.value_hi - self.value_lo)


def pair_vocab(vocab_size: int, filler: str) -> PairVocab:
    """Zoology's halves for random filler (keys 1..V/2-1, values V/2..V-1); for prose (bytes),
    the two quarters above ASCII, so that the filler can neither state nor ask a pair."""
    if filler not in FILLERS:
        raise ValueError(f"filler must be one of {FILLERS}, got {filler!r}")
    if filler == "prose":
        if vocab_size != 256:
            raise ValueError(f"prose filler is byte level: vocab_size must be 256, got {vocab_size}")
        return PairVocab(128, 192, 192, 256)
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4 to hold a key and a value, got {vocab_size}")
    half = vocab_size // 2
    return PairVocab(1, half, half, vocab_size)


def check_pairs(pairs: int, vocab: PairVocab, vocab_size: int) -> None:
    """A sequence cannot hold more distinct keys (or values) than its half of the vocabulary."""
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    if pairs > vocab.max_pairs:
        raise ValueError(f"{pairs} key-value pairs do not fit a vocabulary of {vocab_size}: keys and values come "
                         f"from disjoint ranges that hold at most {vocab.max_pairs} distinct pairs")


def check_mqar_length(seq_len: int, pairs: int) -> None:
    """The pairs take ``2P`` tokens and the queries need ``P`` of the ``(L - 2P) // 2`` query
    slots, so ``L >= 4P``."""
    if seq_len < 4 * pairs:
        raise ValueError(f"a sequence of {seq_len} tokens is too short for {pairs} pairs: it needs at least "
                         f"4 * pairs = {4 * pairs} (2 tokens per pair and 2 per query)")


def check_gap(gap: int) -> None:
    """A gap is a number of tokens."""
    if gap < 0:
        raise ValueError(f"gap must be >= 0 tokens, got {gap}")


def batch_generator(seed: int, split: str, *index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator of its own for every (seed, split, cell, batch): train, valid and test
    sequences come from disjoint streams, and every model sees the same ones."""
    words = np.random.SeedSequence([seed, SPLITS[split], *index]).generate_state(2)
    return torch.Generator(device=device).manual_seed(int(words[0]) << 32 | int(words[1]))


@dataclass(frozen=True)
class RecallBatch:
    """Sequences with their questions. Query ``j`` of row ``b`` sits at ``query_pos[b, j]``,
    asks for the pair whose value sits at ``answer_pos[b, j]``, and its answer is ``answers[b, j]``."""

    tokens: Tensor
    """The input tokens. (B, T) int64"""
    query_pos: Tensor
    """Stream position of each query key. (B, P) int64"""
    answer_pos: Tensor
    """Stream position of the value that answers each query. (B, P) int64"""
    answers: Tensor
    """The value token each query must predict. (B, P) int64"""

    def targets(self) -> Tensor:
        """Per-position targets as a loss would see them: the answer at each query position,
        -100 (ignored) everywhere else."""
        out = torch.full_like(self.tokens, -100)  # (B, T)
        return out.scatter(1, self.query_pos, self.answers)  # (B, T)


@dataclass(frozen=True)
class Filler:
    """Tokens between and around the pairs: random tokens, or slices of prose."""

    vocab_size: int
    """V: random filler is drawn from [0, V)."""
    vocab: PairVocab
    """Where this sequence's keys live (random filler never contains them)."""
    text: Tensor | None = None
    """Prose bytes to slice from (None: random tokens). (N,) int64"""

    def __call__(self, batch: int, length: int, keys: Tensor, gen: torch.Generator) -> Tensor:
        """(B, length) tokens without any of each row's ``keys`` (B, P)."""
        if self.text is not None:
            return self._prose(batch, length, gen)
        device = keys.device
        tokens = torch.randint(0, self.vocab_size, (batch, length), generator=gen, device=device)  # (B, T)
        sorted_keys = keys.sort(dim=1).values  # (B, P)
        where = torch.searchsorted(sorted_keys, tokens).clamp(max=keys.shape[1] - 1)  # (B, T)
        clash = sorted_keys.gather(1, where) == tokens  # (B, T)
        redraw = torch.randint(self.vocab.value_lo, self.vocab.value_hi, (batch, length), generator=gen,
                               device=device)  # (B, T)
        return torch.where(clash, redraw, tokens)  # (B, T)

    def _prose(self, batch: int, length: int, gen: torch.Generator) -> Tensor:
        """A contiguous slice per row from a random offset, wrapping around the text."""
        text = self.text
        starts = torch.randint(0, text.numel(), (batch, 1), generator=gen, device=text.device)  # (B, 1)
        index = (starts + torch.arange(length, device=text.device)) % text.numel()  # (B, T)
        return text[index]  # (B, T)


def sample_pairs(batch: int, pairs: int, vocab: PairVocab, gen: torch.Generator,
                 device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Keys and values per row, each drawn without replacement from its own range."""
    key_order = torch.rand(batch, vocab.key_hi - vocab.key_lo, generator=gen, device=device).argsort(dim=1)  # (B, K)
    value_order = torch.rand(batch, vocab.value_hi - vocab.value_lo, generator=gen,
                             device=device).argsort(dim=1)  # (B, Vh)
    return vocab.key_lo + key_order[:, :pairs], vocab.value_lo + value_order[:, :pairs]  # (B, P) twice


def _place_pairs(tokens: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Write ``k_0 v_0 k_1 v_1 ...`` at the start of every row."""
    pairs = keys.shape[1]
    tokens = tokens.clone()  # (B, T)
    tokens[:, 0 : 2 * pairs : 2] = keys
    tokens[:, 1 : 2 * pairs : 2] = values
    return tokens  # (B, T)


def mqar_batch(batch: int, seq_len: int, pairs: int, filler: Filler, power: float, gen: torch.Generator,
               device: torch.device | str) -> RecallBatch:
    """Rung 1 (Zoology's MQAR): pairs first, each key asked once at one of the
    ``S = (L - 2P) // 2`` even query slots after them, slot ``s`` drawn (without replacement)
    with weight ``(s + 1) ** (power - 1)``."""
    check_pairs(pairs, filler.vocab, filler.vocab_size)
    check_mqar_length(seq_len, pairs)
    if not 0 < power <= 1:
        raise ValueError(f"power must be in (0, 1], got {power}")
    keys, values = sample_pairs(batch, pairs, filler.vocab, gen, device)  # (B, P) twice
    tokens = _place_pairs(filler(batch, seq_len, keys, gen), keys, values)  # (B, L)
    slots = (seq_len - 2 * pairs) // 2
    weight = torch.arange(1, slots + 1, device=device, dtype=torch.float64) ** (power - 1)  # (S,)
    chosen = torch.multinomial(weight.expand(batch, slots), pairs, replacement=False, generator=gen)  # (B, P)
    query_pos = 2 * pairs + 2 * chosen  # (B, P); query j asks key j
    tokens = tokens.scatter(1, query_pos, keys)  # (B, L)
    answer_pos = (2 * torch.arange(pairs, device=device) + 1).expand(batch, pairs)  # (B, P)
    return RecallBatch(tokens=tokens, query_pos=query_pos, answer_pos=answer_pos, answers=values)


def gap_batch(batch: int, pairs: int, gap: int, filler: Filler, gen: torch.Generator,
              device: torch.device | str) -> RecallBatch:
    """Rung 2: ``[pairs: 2P][filler: G][queries: 2P]``, the keys asked in a random order, each
    query followed by one filler token."""
    check_pairs(pairs, filler.vocab, filler.vocab_size)
    check_gap(gap)
    keys, values = sample_pairs(batch, pairs, filler.vocab, gen, device)  # (B, P) twice
    length = 4 * pairs + gap
    tokens = _place_pairs(filler(batch, length, keys, gen), keys, values)  # (B, T)
    order = torch.rand(batch, pairs, generator=gen, device=device).argsort(dim=1)  # (B, P): pair asked j-th
    query_pos = (2 * pairs + gap + 2 * torch.arange(pairs, device=device)).expand(batch, pairs)  # (B, P)
    tokens = tokens.scatter(1, query_pos, keys.gather(1, order))  # (B, T)
    return RecallBatch(tokens=tokens, query_pos=query_pos.contiguous(), answer_pos=2 * order + 1,
                       answers=values.gather(1, order))


def load_prose(split: str, device: torch.device | str = "cpu") -> Tensor:
    """A split of the shipped Shakespeare as byte tokens (train for training, valid for the
    sweep, test for scoring). It must be ASCII: bytes >= 128 are the pairs' own."""
    from horizonlm.data.sources import shakespeare

    data = np.frombuffer(shakespeare().splits[split], dtype=np.uint8)
    if data.size == 0 or int(data.max()) >= 128:
        raise HorizonError(f"the {split} prose must be non-empty ASCII: bytes >= 128 are reserved for keys and values")
    return torch.from_numpy(data.astype(np.int64)).to(device)  # (N,)
