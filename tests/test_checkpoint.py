"""Checkpoints: corrupt, truncated, mismatched, interrupted writes; never unpickled."""

from __future__ import annotations

import errno
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from horizonlm import HorizonConfig, HorizonLM, checkpoint
from horizonlm.checkpoint import load_checkpoint, save_checkpoint
from horizonlm.errors import HorizonError


def _model(seed: int = 0) -> HorizonLM:
    torch.manual_seed(seed)
    return HorizonLM(HorizonConfig.preset("tiny"))


def test_round_trip(tmp_path: Path) -> None:
    model = _model()
    save_checkpoint(tmp_path, 5, model, {"tokenizer": {"kind": "byte"}})
    loaded = load_checkpoint(tmp_path)
    x = torch.randint(0, 256, (1, 20))
    assert torch.equal(loaded.model(x)[0], model(x)[0])
    assert loaded.model.head.weight is loaded.model.embed.weight  # tying survives


def test_truncated_and_corrupt(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, _model(), {})
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(HorizonError, match="corrupt checkpoint.*sha256"):
        load_checkpoint(tmp_path)
    (path / "checkpoint.json").write_text("{not json")
    with pytest.raises(HorizonError, match="not valid JSON"):
        load_checkpoint(tmp_path)
    with pytest.raises(HorizonError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def test_pickle_payload_is_not_executed(tmp_path: Path) -> None:
    """A pickle in place of the weights is rejected as data, never unpickled."""
    path = save_checkpoint(tmp_path, 1, _model(), {})
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # creates the marker if ever unpickled

    (path / "model.safetensors").write_bytes(pickle.dumps(Payload()))

    meta = json.loads((path / "checkpoint.json").read_text())
    meta["files"] = {}
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(HorizonError, match="cannot read model.safetensors"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_mismatched_config(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, _model(), {})
    other = HorizonConfig.preset("tiny", d_model=48).to_dict()
    with pytest.raises(HorizonError, match="d_model: checkpoint 32 vs requested 48"):
        load_checkpoint(tmp_path, expect_config=other)


def test_disk_full_keeps_previous(tmp_path: Path, monkeypatch) -> None:
    save_checkpoint(tmp_path, 1, _model(0), {})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, _model(1), {})
    assert load_checkpoint(tmp_path).info["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]


def test_kill_during_write_keeps_previous(tmp_path: Path) -> None:
    """A process killed (os._exit, no cleanup) midway through a save leaves `latest` loadable."""
    script = textwrap.dedent(f"""
        import os, torch
        from horizonlm import HorizonConfig, HorizonLM, checkpoint
        torch.manual_seed(0)
        model = HorizonLM(HorizonConfig.preset("tiny"))
        checkpoint.save_checkpoint({str(tmp_path)!r}, 1, model, {{}})
        real = checkpoint.sha256_file
        def dying(path):
            os._exit(137)  # killed after the weights were written, before the rename
        checkpoint.sha256_file = dying
        checkpoint.save_checkpoint({str(tmp_path)!r}, 2, model, {{}})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 137, result.stderr
    assert any(p.name.startswith(".step-00000002") for p in tmp_path.iterdir())  # the half-written one
    assert load_checkpoint(tmp_path).info["step"] == 1


def test_keeps_last_two(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, _model(), {})
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
