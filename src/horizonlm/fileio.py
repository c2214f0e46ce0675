"""Atomic file writes and checksums: a crash or a full disk never leaves a half-written file
under a name that readers trust."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from horizonlm.errors import HorizonError


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, fsync it, then rename it over ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder ``tmp`` to ``final`` (replacing an older one), fsynced.

    The old folder is renamed aside before the new one takes its name, so at every instant
    either the old or the new folder is complete under one of the two names.
    """
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)


def check_files(folder: Path, files: dict[str, str], what: str) -> None:
    """Every file named in ``files`` exists under ``folder`` with its recorded sha256.

    ``what`` starts the error message ("corrupt checkpoint ...", "saved context ...")."""
    for name, digest in files.items():
        file = folder / name
        if not file.is_file():
            raise HorizonError(f"{what}: {name} is missing")
        if sha256_file(file) != digest:
            raise HorizonError(f"{what}: {name} is damaged (sha256 mismatch: truncated or changed)")
