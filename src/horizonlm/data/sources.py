"""Readers for the named corpora. Each returns the raw bytes of every split, the documents
(name, byte range) inside each split, and the sha256 of what it read."""

from __future__ import annotations

import hashlib
import json
import tarfile
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from horizonlm.errors import HorizonError
from horizonlm.fileio import sha256_file

SPLITS = ("train", "valid", "test")
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"
ENWIK8_SIZES = (90_000_000, 5_000_000, 5_000_000)


@dataclass
class Corpus:
    """Split name -> bytes, plus where each document starts and ends inside its split."""

    splits: dict[str, bytes]
    documents: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    source_sha256: dict[str, str] = field(default_factory=dict)
    word_level: bool = False
    """True where the text is already word-tokenised (WikiText ``.tokens``)."""


def normalise_text(data: bytes) -> bytes:
    """Drop a UTF-8 byte-order mark and turn CRLF (and lone CR) line ends into LF."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _split_fractions(data: bytes, fractions=(0.9, 0.05, 0.05)) -> dict[str, bytes]:
    n = len(data)
    a = int(n * fractions[0])
    b = a + int(n * fractions[1])
    return {"train": data[:a], "valid": data[a:b], "test": data[b:]}


def _join(docs: list[tuple[str, bytes]]) -> tuple[bytes, list[tuple[str, int, int]]]:
    """Concatenate documents with a blank line between them, remembering their byte ranges."""
    out, ranges, pos = [], [], 0
    for name, text in docs:
        if out:
            out.append(b"\n\n")
            pos += 2
        out.append(text)
        ranges.append((name, pos, pos + len(text)))
        pos += len(text)
    return b"".join(out), ranges


def shakespeare() -> Corpus:
    """The 1.1 MB Shakespeare excerpt shipped in the package, split 90/5/5 by bytes."""
    data = resources.files("horizonlm.data").joinpath("corpora/shakespeare.txt").read_bytes()
    return Corpus(splits=_split_fractions(data), source_sha256={"shakespeare.txt": hashlib.sha256(data).hexdigest()})


def novels(root: str | Path) -> Corpus:
    """The 100-novel corpus with its fixed ``split.json`` (train: all other files, sorted)."""
    root = Path(root)
    split_path, archive = root / "split.json", root / "100_english_novels_corpus.tar.xz"
    for path in (split_path, archive):
        if not path.is_file():
            raise HorizonError(f"novels: {path} not found (give the folder with --source)")
    split = json.loads(split_path.read_text())
    texts: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:xz") as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.startswith("corpus/") and member.name.endswith(".txt"):
                    texts[Path(member.name).name] = normalise_text(tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError) as err:
        raise HorizonError(f"novels: cannot read {archive}: {err}") from err
    held = set(split["valid"]) | set(split["test"]) | set(split["exclude"])
    names = {"train": sorted(n for n in texts if n not in held), "valid": split["valid"], "test": split["test"]}
    corpus = Corpus(splits={}, source_sha256={archive.name: sha256_file(archive), split_path.name: sha256_file(split_path)})
    for name in SPLITS:
        missing = [n for n in names[name] if n not in texts]
        if missing:
            raise HorizonError(f"novels: {', '.join(missing)} listed in split.json is not in the archive")
        corpus.splits[name], corpus.documents[name] = _join([(n, texts[n]) for n in names[name]])
    return corpus


def _find_wikitext_file(folder: Path, split: str) -> tuple[Path, bool] | None:
    for suffix, word_level in (("tokens", True), ("raw", False)):
        candidates = sorted(folder.glob(f"*wiki.{split}.{suffix}"))
        if candidates:
            return candidates[0], word_level
    return None


def wikitext(folder: str | Path) -> Corpus:
    """``wiki.{train,valid,test}.tokens`` (word level) or ``.raw`` from a folder the user gives.

    Splits that are missing are left out (a test-only folder can still be evaluated)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HorizonError(f"wikitext: {folder} is not a folder")
    corpus = Corpus(splits={})
    kinds = set()
    for split in SPLITS:
        found = _find_wikitext_file(folder, split)
        if found is None:
            continue
        path, word_level = found
        kinds.add(word_level)
        corpus.splits[split] = path.read_bytes()
        corpus.source_sha256[path.name] = sha256_file(path)
    if not corpus.splits:
        raise HorizonError(f"wikitext: no wiki.{{train,valid,test}}.{{tokens,raw}} files in {folder}")
    if len(kinds) > 1:
        raise HorizonError(f"wikitext: {folder} mixes .tokens and .raw files; keep one kind")
    corpus.word_level = kinds.pop()
    return corpus


def enwik8(path: str | Path) -> Corpus:
    """enwik8 (or enwik8.zip): sha256 verified, split 90M / 5M / 5M bytes."""
    path = Path(path)
    if not path.is_file():
        raise HorizonError(f"enwik8: {path} not found")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if "enwik8" not in archive.namelist():
                raise HorizonError(f"enwik8: {path} has no member named 'enwik8'")
            data = archive.read("enwik8")
    else:
        data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != ENWIK8_SHA256:
        raise HorizonError(f"enwik8: checksum mismatch for {path}: sha256 {digest}, expected {ENWIK8_SHA256}")
    a, b, _ = ENWIK8_SIZES
    return Corpus(splits={"train": data[:a], "valid": data[a : a + b], "test": data[a + b :]},
                  source_sha256={"enwik8": digest})


def text_folder(folder: str | Path) -> Corpus:
    """Every file under a folder (hidden ones aside), sorted, normalised and joined, then split
    90/5/5 by bytes. Each file must be UTF-8."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HorizonError(f"text: {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise HorizonError(f"text: no files under {folder}")
    docs = []
    for path in files:
        data = normalise_text(path.read_bytes())
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise HorizonError(f"text: {path} is not UTF-8 ({err})") from err
        docs.append((str(path.relative_to(folder)), data))
    data, _ = _join(docs)
    if not data.strip():
        raise HorizonError(f"text: the files under {folder} are empty")
    return Corpus(splits=_split_fractions(data), source_sha256={str(p.relative_to(folder)): sha256_file(p) for p in files})


def load_corpus(name: str, source: str | Path | None) -> Corpus:
    if name == "shakespeare":
        return shakespeare()
    if source is None:
        raise HorizonError(f"corpus {name!r} needs --source (a file or folder)")
    readers = {"novels": novels, "wikitext": wikitext, "enwik8": enwik8, "text": text_folder}
    if name not in readers:
        raise HorizonError(f"unknown corpus {name!r}; choose one of shakespeare, {', '.join(readers)}")
    return readers[name](source)


def decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise HorizonError(f"{what} is not valid UTF-8 ({err}); use --tokenizer byte for raw bytes") from err


__all__ = ["Corpus", "load_corpus", "decode_utf8", "normalise_text", "SPLITS"]
