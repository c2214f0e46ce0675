"""Atomic writes: an interruption at any step leaves the old file and no temporary file behind."""

from __future__ import annotations

from pathlib import Path

import pytest

import horizonlm.fileio as fileio


@pytest.mark.parametrize("where", ["_umask", "fsync_dir"])
def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch,
                                                                          where: str) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"old\n")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio, where, interrupt)
    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write_bytes(path, b"new\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]
    # interrupted before the rename the old bytes stay; after it (fsync_dir) the new ones are whole
    assert path.read_bytes() == (b"old\n" if where == "_umask" else b"new\n")
