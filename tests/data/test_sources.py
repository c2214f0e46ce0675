"""Corpus readers on small synthetic files of the real formats, and on ../shared when present."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from horizonlm.data import sources
from horizonlm.data.prepare import prepare
from horizonlm.data.stream import load_meta, open_split
from horizonlm.data.tokenizers import BPETokenizer, WordTokenizer
from horizonlm.errors import HorizonError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_shakespeare_bytes(tmp_path: Path) -> None:
    meta = prepare("shakespeare", tmp_path)
    total = sum(s["bytes"] for s in meta["splits"].values())
    assert total == 1_115_394 and meta["vocab_size"] == 256 and meta["dtype"] == "uint8"
    train = open_split(tmp_path, "train", verify=True)
    assert bytes(train[:12]) == b"First Citize"


def _novels_folder(root: Path) -> None:
    books = {"a.txt": "\ufeffAlpha\r\nline\r\n", "b.txt": "Beta\r\n", "c.txt": "Gamma", "d.txt": "Delta", "x.txt": "X"}
    with tarfile.open(root / "100_english_novels_corpus.tar.xz", "w:xz") as tar:
        for name, text in books.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"corpus/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    split = {"exclude": ["x.txt"], "valid": ["c.txt"], "test": ["d.txt"], "train": "every other file"}
    (root / "split.json").write_text(json.dumps(split))


def test_novels_normalised_and_split(tmp_path: Path) -> None:
    _novels_folder(tmp_path)
    meta = prepare("novels", tmp_path / "out", source=tmp_path)
    train = bytes(open_split(tmp_path / "out", "train"))
    assert train == b"Alpha\nline\n\n\nBeta\n"  # BOM gone, CRLF -> LF, books joined by a blank line
    assert bytes(open_split(tmp_path / "out", "test")) == b"Delta"
    assert [d[0] for d in meta["documents"]["train"]] == ["a.txt", "b.txt"]
    assert meta["documents"]["train"][1][1:] == [13, 18]


@pytest.mark.skipif(not (SHARED / "novels" / "split.json").is_file(), reason="../shared/data not present")
def test_real_novels_split_sizes() -> None:
    corpus = sources.novels(SHARED / "novels")
    assert [len(corpus.documents[s]) for s in ("train", "valid", "test")] == [88, 5, 5]
    assert not corpus.splits["test"].startswith(b"\xef\xbb\xbf") and b"\r\n" not in corpus.splits["test"]


def test_wikitext_word_level(tmp_path: Path) -> None:
    (tmp_path / "wiki.train.tokens").write_text(" = Title = \n \n the cat sat . \n")
    (tmp_path / "wiki.valid.tokens").write_text(" the dog sat . \n")
    (tmp_path / "wiki.test.tokens").write_text(" the cat ran . \n")
    meta = prepare("wikitext", tmp_path / "out", source=tmp_path)
    assert meta["tokenizer"]["kind"] == "word"
    # 4 words + <eos>; 'dog' is unknown; 3 lines in train -> 3 <eos>
    assert meta["splits"]["valid"]["tokens"] == 5 and meta["splits"]["train"]["tokens"] == 3 + 0 + 4 + 3
    vocab = meta["tokenizer"]["words"]
    valid = open_split(tmp_path / "out", "valid").tolist()
    assert vocab[valid[1]] == "<unk>" and vocab[valid[-1]] == "<eos>"


def test_wikitext_raw_is_bytes(tmp_path: Path) -> None:
    (tmp_path / "wiki.test.raw").write_text(" = Title = \n text \n")
    meta = prepare("wikitext", tmp_path / "out", source=tmp_path)
    assert meta["tokenizer"]["kind"] == "byte" and list(meta["splits"]) == ["test"]


@pytest.mark.skipif(not (SHARED / "wikitext").is_dir(), reason="../shared/data not present")
def test_real_wikitext103_word_count() -> None:
    from horizonlm.evaluate import wikitext_word_count

    text = (SHARED / "wikitext" / "wikitext-103.wiki.test.tokens").read_text(encoding="utf-8")
    assert wikitext_word_count(text) == 245_569
    assert len(WordTokenizer.build(text).encode(text)) == 245_569


def test_enwik8_checksum_and_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8))
    (tmp_path / "enwik8").write_bytes(data)
    with pytest.raises(HorizonError, match="checksum mismatch"):
        prepare("enwik8", tmp_path / "out", source=tmp_path / "enwik8")
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as z:
        z.writestr("enwik8", data)
    monkeypatch.setattr(sources, "ENWIK8_SHA256", hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(sources, "ENWIK8_SIZES", (900, 50, 50))
    meta = prepare("enwik8", tmp_path / "out", source=tmp_path / "enwik8.zip")
    assert [meta["splits"][s]["tokens"] for s in ("train", "valid", "test")] == [900, 50, 50]
    assert bytes(open_split(tmp_path / "out", "test")) == data[950:]


def test_text_folder_and_bad_inputs(tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    folder.mkdir()
    with pytest.raises(HorizonError, match="no files"):
        prepare("text", tmp_path / "out", source=folder)
    (folder / "a.txt").write_text("hello world " * 100)
    meta = prepare("text", tmp_path / "out", source=folder, tokenizer="word")
    assert meta["vocab_size"] == 4
    (folder / "b.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(HorizonError, match="not UTF-8"):
        prepare("text", tmp_path / "out", source=folder)
    with pytest.raises(HorizonError, match="not found|not a folder"):
        prepare("text", tmp_path / "out", source=tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.txt").write_text("   ")
    with pytest.raises(HorizonError, match="empty"):
        prepare("text", tmp_path / "out2", source=empty, tokenizer="word")


def test_word_tokenizer_rejects_non_utf8_and_empty(tmp_path: Path) -> None:
    (tmp_path / "wiki.train.raw").write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(HorizonError, match="not valid UTF-8"):
        prepare("wikitext", tmp_path / "out", source=tmp_path, tokenizer="word")
    (tmp_path / "wiki.train.raw").write_text("\n\n")
    with pytest.raises(HorizonError, match="empty"):
        prepare("wikitext", tmp_path / "out", source=tmp_path, tokenizer="word")


def test_bpe_round_trip() -> None:
    text = "the quick brown fox jumps over the lazy dog. " * 50
    tok = BPETokenizer.build(text, vocab_size=300)
    ids = tok.encode("the lazy fox")
    assert tok.decode(ids) == "the lazy fox" and len(ids) < len("the lazy fox")


def test_meta_is_checked(tmp_path: Path) -> None:
    with pytest.raises(HorizonError, match="horizon prepare"):
        load_meta(tmp_path)
    prepare("shakespeare", tmp_path)
    with open(tmp_path / "valid.bin", "ab") as f:
        f.write(b"x")
    with pytest.raises(HorizonError, match="meta.json promises"):
        open_split(tmp_path, "valid")
