"""``horizon prepare``: token streams as numpy ``.bin`` files plus a ``meta.json`` header."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from horizonlm.data.sources import SPLITS, Corpus, decode_utf8, load_corpus
from horizonlm.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    WordTokenizer,
)
from horizonlm.errors import HorizonError
from horizonlm.fileio import atomic_dir, atomic_write_json, existing_file, existing_folder, sha256_file
from horizonlm.progress import show_bars

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


CORPORA = ("shakespeare", "novels", "wikitext", "enwik8", "text")

SOURCES = {
    "novels": ("folder", "the novels folder (../shared/data/novels: the .tar.xz archive and split.json)"),
    "wikitext": ("folder", "a folder with wiki.{train,valid,test}.tokens or .raw"),
    "enwik8": ("file", "the file enwik8 or enwik8.zip"),
    "text": ("folder", "a folder of UTF-8 text files (a single file: put it in a folder of its own)"),
}
"""What ``--source`` must name for each corpus that needs one, in the user's words."""


@dataclass
class PrepareConfig:
    """Settings of ``horizon prepare`` (the corpus name is its positional argument)."""

    source: str = ""
    """What to read: for novels and wikitext a folder, for enwik8 the file enwik8 or enwik8.zip,
    for text a folder of UTF-8 files. The shipped shakespeare needs none."""
    out: str = ""
    """Output folder (default: runs/data/NAME)."""
    tokenizer: str = ""
    """byte, word or bpe (default: byte; word for WikiText .tokens)."""
    bpe_vocab: int = 4096
    """BPE vocabulary size (more than the 256 byte symbols)."""
    overwrite: bool = False
    """Replace the prepared data of another corpus or tokenizer in ``out``."""
    progress: bool | None = None
    """Show a progress bar (default: only when stderr is a terminal; ``--progress`` forces it)."""

    def __post_init__(self) -> None:
        if self.tokenizer not in ("", "byte", "word", "bpe"):
            raise ValueError(f"tokenizer must be one of byte, word, bpe, got {self.tokenizer!r}")
        if self.bpe_vocab <= 256:
            raise ValueError(f"bpe_vocab must be > 256 (the byte symbols), got {self.bpe_vocab}")


def _check_source(name: str, source: str | Path | None) -> None:
    """Refuse an unknown corpus, or a ``--source`` missing or of the wrong kind, before reading anything."""
    if name not in CORPORA:
        raise HorizonError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    if name not in SOURCES:
        return
    kind, what = SOURCES[name]
    if not source:
        raise HorizonError(f"horizon prepare {name} needs --source: {what}")
    if kind == "file":
        existing_file(source, f"--source for {name}")
    else:
        existing_folder(source, f"--source for {name}")


def _existing_data(out: Path) -> dict[str, Any] | None:
    """The meta.json of prepared data already in ``out`` (None when ``out`` is new or empty).
    A folder that holds anything but prepared data is refused: it is never replaced."""
    if out.exists() and not out.is_dir():
        raise HorizonError(f"--out {out} is a file; give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    ours = {"meta.json", *(f"{split}.bin" for split in SPLITS)}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if not (out / "meta.json").is_file() or others:
        raise HorizonError(f"--out {out} holds other files ({', '.join(others) or 'no meta.json'}), not only "
                           "prepared data; give a new or empty folder")
    try:
        return json.loads((out / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _same_data(meta: dict[str, Any], name: str, corpus: Corpus, kind: str, bpe_vocab: int) -> bool:
    """Whether ``meta`` describes this corpus, read from the same files, with this tokenizer."""
    return (meta.get("corpus") == name and meta.get("source_sha256") == corpus.source_sha256
            and meta.get("tokenizer", {}).get("kind") == kind and (kind != "bpe" or meta.get("bpe_vocab") == bpe_vocab))


def _intact(out: Path, meta: dict[str, Any]) -> bool:
    """Every split file is there with the size meta.json gives (the cheap check)."""
    dtype = np.dtype(meta.get("dtype", "uint8"))
    files = {split: out / f"{split}.bin" for split in meta.get("splits", {})}
    return all(files[split].is_file() and files[split].stat().st_size == info["tokens"] * dtype.itemsize
               for split, info in meta.get("splits", {}).items())


def prepare(name: str, out_dir: str | Path, source: str | Path | None = None, tokenizer: str | None = None,
            bpe_vocab: int = 4096, overwrite: bool = False, progress: bool | None = False) -> dict[str, Any]:
    """Read corpus ``name``, tokenise every split and write ``out_dir/{split}.bin`` + ``meta.json``.

    Returns the meta dictionary. The default tokenizer is bytes, except for word-tokenised
    WikiText, which defaults to words. The files are built in a temporary folder that replaces
    ``out_dir`` only when every split is written, so a failure or an interruption leaves
    ``out_dir`` as it was. Data already there from the same source and tokenizer is kept as it
    is; other prepared data is replaced only with ``overwrite``."""
    _check_source(name, source)
    out = Path(out_dir)
    existing = _existing_data(out)
    corpus = load_corpus(name, source)
    kind = tokenizer or ("word" if corpus.word_level else "byte")
    if existing is not None and _same_data(existing, name, corpus, kind, bpe_vocab) and _intact(out, existing):
        return existing
    if existing is not None and not overwrite:
        was = (f"{existing.get('corpus')}, {existing.get('tokenizer', {}).get('kind')} tokens" if existing
               else "meta.json unreadable")
        raise HorizonError(f"--out {out} already holds other prepared data ({was}); pass --overwrite to replace it, "
                           "or give another --out")
    tok = build_tokenizer(kind, corpus, bpe_vocab)
    with atomic_dir(out) as tmp:
        meta = _write_splits(tmp, name, corpus, tok, progress)
        if kind == "bpe":
            meta["bpe_vocab"] = bpe_vocab
        atomic_write_json(tmp / "meta.json", meta)
    return meta


def _write_splits(folder: Path, name: str, corpus: Corpus, tok: Tokenizer, progress: bool | None) -> dict[str, Any]:
    """Tokenise every split into ``folder/{split}.bin``; returns the meta dictionary."""
    dtype = token_dtype(tok.vocab_size)
    splits: dict[str, Any] = {}
    for split in tqdm([s for s in SPLITS if s in corpus.splits], desc=f"prepare {name}", unit="split",
                      disable=not show_bars(progress), leave=False):
        data = corpus.splits[split]
        ids = _encode(tok, data, f"the {split} split")
        if ids.size == 0:
            raise HorizonError(f"{name}: the {split} split is empty (the source is too small to split 90/5/5)")
        path = folder / f"{split}.bin"
        ids.astype(dtype).tofile(path)
        text_lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
        splits[split] = {"tokens": int(ids.size), "bytes": len(data), "lines": text_lines, "sha256": sha256_file(path)}
    return {
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
