"""``horizon prepare``: token streams as numpy ``.bin`` files plus a ``meta.json`` header."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from horizonlm.data.sources import SPLITS, Corpus, decode_utf8, load_corpus
from horizonlm.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    WordTokenizer,
)
from horizonlm.errors import HorizonError
from horizonlm.fileio import atomic_write, atomic_write_json, sha256_file

META_FORMAT = 1


def token_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    if vocab_size <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def build_tokenizer(kind: str, corpus: Corpus, bpe_vocab: int) -> Tokenizer:
    if kind == "byte":
        return ByteTokenizer()
    train = corpus.splits.get("train")
    if train is None:
        raise HorizonError(f"tokenizer {kind!r} is built from the train split, which this corpus lacks")
    text = decode_utf8(train, "the train split")
    if not text.strip():
        raise HorizonError("the train split is empty")
    if kind == "word":
        return WordTokenizer.build(text)
    if kind == "bpe":
        return BPETokenizer.build(text, bpe_vocab)
    raise HorizonError(f"tokenizer must be byte, word or bpe, got {kind!r}")


def _encode(tokenizer: Tokenizer, data: bytes, what: str) -> np.ndarray:
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(data, dtype=np.uint8)
    return np.asarray(tokenizer.encode(decode_utf8(data, what)), dtype=np.int64)


def prepare(name: str, out_dir: str | Path, source: str | Path | None = None, tokenizer: str | None = None,
            bpe_vocab: int = 4096) -> dict[str, Any]:
    """Read corpus ``name``, tokenise every split and write ``out_dir/{split}.bin`` + ``meta.json``.

    Returns the meta dictionary. The default tokenizer is bytes, except for word-tokenised
    WikiText, which defaults to words."""
    corpus = load_corpus(name, source)
    kind = tokenizer or ("word" if corpus.word_level else "byte")
    tok = build_tokenizer(kind, corpus, bpe_vocab)
    dtype = token_dtype(tok.vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, Any] = {}
    for split in SPLITS:
        if split not in corpus.splits:
            continue
        data = corpus.splits[split]
        ids = _encode(tok, data, f"the {split} split")
        if ids.size == 0:
            raise HorizonError(f"{name}: the {split} split is empty")
        path = out / f"{split}.bin"
        atomic_write(path, lambda tmp, ids=ids: ids.astype(dtype).tofile(tmp))
        text_lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
        splits[split] = {"tokens": int(ids.size), "bytes": len(data), "lines": text_lines, "sha256": sha256_file(path)}
    meta = {
        "format": META_FORMAT,
        "corpus": name,
        "tokenizer": tok.spec(),
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "word_level_source": corpus.word_level,
        "splits": splits,
        "documents": {k: [list(d) for d in v] for k, v in corpus.documents.items()},
        "source_sha256": corpus.source_sha256,
    }
    atomic_write_json(out / "meta.json", meta)
    return meta
