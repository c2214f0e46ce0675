"""Atomic file writes and checksums: a crash or a full disk never leaves a half-written file
under a name that readers trust."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    tmp_path = Path(tmp)
    try:  # from here on an interruption (even inside _umask) removes the temporary file
        os.close(fd)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
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
    either the old or the new folder is complete under one of the two names; interrupted between
    the two renames (Ctrl-C), the old folder is put back.
    """
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        finally:
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, final)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``final`` to fill; when the block ends normally it replaces
    ``final`` (see :func:`replace_dir`), when it raises (or is interrupted) it is removed and
    ``final`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refuse_existing(path: str | Path, overwrite: bool) -> Path:
    """``path`` as a Path, after refusing (a :class:`HorizonError`) to replace a results file
    that is there unless ``overwrite``: checked before any work, so nothing is measured for a
    file that would not be written."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise HorizonError(f"{path} exists; pass --overwrite to replace it or --out for another file")
    return path


def existing_file(path: str | Path, what: str) -> Path:
    """``path`` when it names a file; otherwise a :class:`HorizonError` that starts with
    ``what`` (the flag, in the user's words) and says what the path is instead."""
    path = Path(path)
    if path.is_dir():
        raise HorizonError(f"{what}: {path} is a folder; give a file")
    if not path.exists():
        raise HorizonError(f"{what}: {path} not found")
    if not path.is_file():
        raise HorizonError(f"{what}: {path} is not a regular file")
    return path


def existing_folder(path: str | Path, what: str) -> Path:
    """``path`` when it names a folder; otherwise a :class:`HorizonError` as in :func:`existing_file`."""
    path = Path(path)
    if not path.exists():
        raise HorizonError(f"{what}: {path} not found")
    if not path.is_dir():
        raise HorizonError(f"{what}: {path} is a file; give a folder")
    return path


def not_text(path: str | Path, sample: int = 1 << 16) -> str | None:
    """Why the start of the file does not look like UTF-8 text (a NUL byte, or a byte that is not
    UTF-8), or None when it does. A character cut by the end of the sample is not held against it."""
    with open(path, "rb") as f:
        head = f.read(sample)
    nul = head.find(b"\0")
    if nul >= 0:
        return f"it holds NUL bytes (the first at byte {nul})"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.reason != "unexpected end of data" or len(head) < sample:
            return f"byte {err.start} is not UTF-8"
    return None


def check_files(folder: Path, files: dict[str, str], what: str) -> None:
    """Every file named in ``files`` exists under ``folder`` with its recorded sha256.

    ``what`` starts the error message ("corrupt checkpoint ...", "saved context ...")."""
    for name, digest in files.items():
        file = folder / name
        if not file.is_file():
            raise HorizonError(f"{what}: {name} is missing")
        if sha256_file(file) != digest:
            raise HorizonError(f"{what}: {name} is damaged (sha256 mismatch: truncated or changed)")
