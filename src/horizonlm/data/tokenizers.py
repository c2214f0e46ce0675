"""Tokenizers: bytes (default, V=256), words (WikiText style, with <unk> and <eos>) and BPE
(through the ``tokenizers`` library). Each is described by a JSON-able spec kept in meta.json."""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from horizonlm.errors import HorizonError


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def spec(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes; decoding replaces an incomplete or invalid sequence rather than failing."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        return {"kind": "byte"}


class WordTokenizer:
    """Whitespace-separated words and one ``<eos>`` per line, blank lines included (the WikiText
    convention: 245,569 tokens for the WikiText-103 test split)."""

    UNK, EOS = "<unk>", "<eos>"

    def __init__(self, words: list[str]) -> None:
        if not words:
            raise HorizonError("word vocabulary is empty: the training text has no words")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        self.vocab_size = len(words)

    @classmethod
    def build(cls, text: str, max_size: int | None = None) -> WordTokenizer:
        counts = Counter(text.split())
        counts.pop(cls.UNK, None)
        counts.pop(cls.EOS, None)
        ordered = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        if max_size is not None:
            ordered = ordered[: max(0, max_size - 2)]
        if not ordered:
            raise HorizonError("word vocabulary is empty: the training text has no words")
        return cls([cls.EOS, cls.UNK, *ordered])

    def encode(self, text: str) -> list[int]:
        unk, eos = self.index[self.UNK], self.index[self.EOS]
        ids: list[int] = []
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # a final newline ends the last line; it does not start another
        for line in lines:
            ids.extend(self.index.get(w, unk) for w in line.split())
            ids.append(eos)
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join("\n" if self.words[i] == self.EOS else self.words[i] for i in ids)

    def spec(self) -> dict[str, Any]:
        return {"kind": "word", "words": self.words}


class BPETokenizer:
    """Byte-level BPE trained with the Hugging Face ``tokenizers`` library."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def build(cls, text: str, vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator([text[i : i + 100_000] for i in range(0, len(text), 100_000)], trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def spec(self) -> dict[str, Any]:
        return {"kind": "bpe", "json": self.tok.to_str()}


def require_byte_level(spec: dict[str, Any], why: str) -> None:
    """Refuse a non-byte tokenizer spec (from meta.json or a checkpoint) where raw bytes are fed
    or written; ``why`` begins the message. A spec without a kind is byte level."""
    kind = spec.get("kind", "byte")
    if kind != "byte":
        raise HorizonError(f"{why}: it needs byte-level tokens, got {kind}-level")


def tokenizer_from_spec(spec: dict[str, Any]) -> Tokenizer:
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "word":
        return WordTokenizer(list(spec["words"]))
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(spec["json"]))
    raise HorizonError(f"unknown tokenizer kind {kind!r} in meta.json")


