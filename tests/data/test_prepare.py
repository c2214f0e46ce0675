"""``horizon prepare`` never damages prepared data: a failure or an interruption leaves the
folder as it was, the same data is kept as it is, other data is replaced only with overwrite."""

from __future__ import annotations

from pathlib import Path

import pytest

from horizonlm.data import prepare as prepare_module
from horizonlm.data.prepare import prepare
from horizonlm.errors import HorizonError


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _texts(root: Path, name: str, text: str) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "a.txt").write_text(text)
    return folder


def test_a_failed_prepare_leaves_the_existing_data_as_it_was(tmp_path: Path) -> None:
    """Issue 13.4: a source too small to split fails without touching the good data in --out."""
    prepare("text", tmp_path / "out", source=_texts(tmp_path, "good", "plenty of good text here. " * 400))
    before = _files(tmp_path / "out")
    tiny = _texts(tmp_path, "tiny", "ab")
    with pytest.raises(HorizonError, match="the valid split is empty"):
        prepare("text", tmp_path / "out", source=tiny, overwrite=True)
    assert _files(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "out", "tiny"]  # no temporary folder left


def test_an_interrupted_prepare_leaves_the_existing_data_as_it_was(tmp_path: Path, monkeypatch) -> None:
    prepare("shakespeare", tmp_path / "out")
    before = _files(tmp_path / "out")
    real = prepare_module.sha256_file
    calls = {"n": 0}

    def interrupted(path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C with the train split written, the valid one not yet
        return real(path)

    monkeypatch.setattr(prepare_module, "sha256_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare("shakespeare", tmp_path / "out", tokenizer="word", overwrite=True)
    assert _files(tmp_path / "out") == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_same_data_is_kept_and_other_data_needs_overwrite(tmp_path: Path) -> None:
    first = prepare("shakespeare", tmp_path / "out")
    before = _files(tmp_path / "out")
    assert prepare("shakespeare", tmp_path / "out") == first  # nothing to do: not even rewritten
    assert _files(tmp_path / "out") == before
    with pytest.raises(HorizonError, match="already holds other prepared data .*--overwrite"):
        prepare("shakespeare", tmp_path / "out", tokenizer="word")
    assert _files(tmp_path / "out") == before
    assert prepare("shakespeare", tmp_path / "out", tokenizer="word", overwrite=True)["tokenizer"]["kind"] == "word"


def test_a_folder_of_other_files_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(HorizonError, match="holds other files"):
        prepare("shakespeare", tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(HorizonError, match="is a file; give a folder"):
        prepare("shakespeare", tmp_path / "a-file")
