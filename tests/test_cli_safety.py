"""The command line never loses a user's work (issue 13), as a property: for any sequence of
``prepare``, ``train``, ``eval``, ``passkey`` and ``ingest`` commands with valid or invalid
arguments, interrupted at any point (Ctrl-C as an exception at a random call, or a real SIGINT),
no file that existed before a command is changed by it, except by an explicit ``--overwrite``,
``--resume`` (the run's folder) or an append: a log only grows, a results file only gains
entries, a saved context is read further (ingest is resumable by design). Nothing half-written
(hidden temporary files or folders) is left behind.

Interruptions are placed by counting the calls into horizonlm's own functions (``sys.settrace``)
and interrupting at call number k."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from horizonlm.cli import main
from horizonlm.data.sources import shakespeare

PACKAGE = f"{os.sep}horizonlm{os.sep}"
TRAIN = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--eval-tokens", "32", "--eval-window", "32",
         "--save-every", "1", "--device", "cpu", "--no-progress"]
PASSKEY = ["--haystack", "hay.txt", "--lengths", "256", "--depths", "50", "--trials", "1", "--window", "128",
           "--device", "cpu", "--no-progress"]
INGEST = ["--window", "128", "--save-every", "256", "--device", "cpu", "--no-progress"]
BAD = [["--max-minutes", "-1"], ["--seq-len", "0"], ["--window", "0"], ["--trials", "0"],
       ["--model-overrides", '{"bogus": 1}'], ["--max-tokens", "-5"]]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A user's folder: prepared data, a trained run with passkey results, a saved context, texts."""
    root = tmp_path_factory.mktemp("user")
    text = shakespeare().splits["test"]
    (root / "texts").mkdir()
    (root / "texts" / "a.txt").write_bytes(text[:30000])
    (root / "tiny").mkdir()
    (root / "tiny" / "t.txt").write_text("ab")
    (root / "hay.txt").write_bytes(text[:6000])
    (root / "blob.bin").write_bytes(bytes(range(256)) * 8)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["prepare", "shakespeare", "--out", "data", "--no-progress"]) == 0
        assert main(["train", "--data", "data", "--out", "run", "--steps", "2", *TRAIN]) == 0
        assert main(["passkey", "--checkpoint", "run", *PASSKEY]) == 0
        assert main(["ingest", "hay.txt", "--checkpoint", "run", "--context", "ctx", *INGEST]) == 0
    finally:
        os.chdir(cwd)
    return root


@st.composite
def command(draw) -> list[str]:
    """One command line, valid or not, aimed at the user's files more often than not."""
    def pick(*options):
        return draw(st.sampled_from(options))

    def often() -> bool:
        return draw(st.integers(0, 2)) > 0

    kind = pick("prepare", "train", "eval", "passkey", "ingest")
    if kind == "prepare":
        name = pick("shakespeare", "text")
        argv = ["prepare", name, "--out", pick("data", "data", "data", "data2", "run", "hay.txt"), "--no-progress"]
        if name == "text" or not often():
            argv += ["--source", pick("texts", "texts", "tiny", "texts/a.txt", "missing")]
        if draw(st.booleans()):
            argv += ["--tokenizer", pick("byte", "word")]
    elif kind == "train":
        argv = ["train", "--data", pick("data", "data", "data2", "missing"), "--out", pick("run", "run", "run2"),
                "--steps", str(draw(st.integers(1, 3))), *TRAIN]
        if not often():
            argv.append("--resume")
    elif kind == "eval":
        argv = ["eval", "--checkpoint", pick("run", "run2", "missing"), "--max-tokens", "64", "--window", "32",
                "--device", "cpu", "--no-progress"]
        if often():
            argv += pick(["--data", "data"], ["--data", "data2"], ["--text", "hay.txt"], ["--text", "blob.bin"],
                         ["--text", "texts"])
    elif kind == "passkey":
        argv = ["passkey", "--checkpoint", pick("run", "run", "run2"), *PASSKEY]
        if not often():
            argv += ["--label", pick("horizon", "other")]
        if not often():
            argv += ["--out", pick("results.json", "hay.txt", "run/passkey.json")]
    else:
        argv = ["ingest", pick("hay.txt", "blob.bin", "texts", "missing"), "--checkpoint", pick("run", "run2"),
                "--context", pick("ctx", "ctx2"), *INGEST]
    if kind in ("prepare", "train", "passkey") and draw(st.integers(0, 4)) == 0:
        argv.append("--overwrite")
    if draw(st.integers(0, 5)) == 0:
        argv += pick(*BAD)
    return argv


interruption = st.one_of(st.none(), st.tuples(st.integers(1, 1500), st.sampled_from(["exception", "SIGINT"])))
"""Where to interrupt: at the k-th call into horizonlm (a command makes a few hundred to a few thousand)."""


def _run(argv: list[str], interrupt: tuple[int, str] | None) -> int:
    """``horizon ARGV``, interrupted at the k-th call into horizonlm if asked; the exit code."""
    calls = 0

    def tracer(frame, event, arg):
        nonlocal calls
        if event == "call" and PACKAGE in frame.f_code.co_filename:
            calls += 1
            if calls == interrupt[0]:
                sys.settrace(None)
                if interrupt[1] == "SIGINT":
                    signal.raise_signal(signal.SIGINT)
                else:
                    raise KeyboardInterrupt
        return None

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if interrupt is not None:
        sys.settrace(tracer)
    try:
        return main(argv)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exit_info:  # argparse refused the command line
        return int(exit_info.code or 0)
    finally:
        sys.settrace(None)
        for s, handler in handlers.items():  # an interrupt inside training's handler swap may skip its undo
            signal.signal(s, handler)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _value(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _models(data: bytes) -> dict:
    try:
        return json.loads(data)["models"]
    except (ValueError, KeyError, TypeError):
        return {}


def _allowed(path: str, old: bytes, new: bytes | None, argv: list[str], code: int) -> bool:
    """Whether ``argv`` may have turned ``old`` into ``new`` (None: deleted)."""
    if "--overwrite" in argv:
        return True
    if "--resume" in argv and path.startswith(f"{_value(argv, '--out')}/"):
        return True
    if argv[0] == "ingest" and path.startswith(f"{_value(argv, '--context')}/"):
        return True  # a saved context is read further: resumable, appendable
    if new is None:
        return False
    if path.endswith(".jsonl"):
        return new.startswith(old)
    if argv[0] == "passkey" and path.endswith(".json"):
        old_models, new_models = _models(old), _models(new)
        return bool(old_models) and all(new_models.get(k) == v for k, v in old_models.items())
    return argv[0] == "passkey" and path.endswith(".png") and code == 0  # redrawn from the results


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(command(), interruption), min_size=1, max_size=3))
def test_no_command_loses_a_users_work(base: Path, tmp_path_factory, steps) -> None:
    root = tmp_path_factory.mktemp("work")
    shutil.rmtree(root)
    shutil.copytree(base, root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for argv, interrupt in steps:
            before = _files(root)
            code = _run(argv, interrupt)
            after = _files(root)
            for path, old in before.items():
                new = after.get(path)
                assert new == old or _allowed(path, old, new, argv, code), \
                    f"`horizon {' '.join(argv)}` (interrupt {interrupt}, exit {code}) changed {path}"
            hidden = [p for p in root.rglob(".*") if str(p.relative_to(root)) not in before]
            assert not hidden, f"`horizon {' '.join(argv)}` (interrupt {interrupt}) left {hidden}"
    finally:
        os.chdir(cwd)
