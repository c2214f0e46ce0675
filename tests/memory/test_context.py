"""Saved contexts: ingest, resume, append, continue; refusals; a kill during a save."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from horizonlm import HorizonConfig, HorizonLM
from horizonlm import ingest as ingest_module
from horizonlm.checkpoint import load_checkpoint, save_checkpoint
from horizonlm.cli import main
from horizonlm.context import load_context
from horizonlm.errors import HorizonError
from horizonlm.ingest import IngestConfig, ingest


@pytest.fixture
def setup(tmp_path: Path):
    torch.manual_seed(0)
    model = HorizonLM(HorizonConfig.preset("tiny", memory_capacity=4096))
    save_checkpoint(tmp_path / "ckpt", 1, model, {"tokenizer": {"kind": "byte"}})
    files = []
    for i, text in enumerate(["The pass key is 48213. " * 7, "Remember it well. " * 11, "Third file here. " * 5]):
        path = tmp_path / f"f{i}.txt"
        path.write_text(text)
        files.append(path)
    return tmp_path, files


def _cfg(root: Path, **kw) -> IngestConfig:
    return IngestConfig(**{**dict(checkpoint=str(root / "ckpt"), context=str(root / "ctx"), window=50,
                                  save_every=60, device="cpu", progress=False), **kw})


def test_ingest_equals_one_stream_and_appends(setup) -> None:
    root, files = setup
    result = ingest([str(f) for f in files[:2]], _cfg(root))
    model = load_checkpoint(root / "ckpt").model.eval()
    data = b"".join(f.read_bytes() for f in files[:2])
    assert result["tokens"] == len(data)
    state, manifest = load_context(root / "ctx", model)
    assert state.pos == manifest["position"] == len(data)
    probe = torch.tensor([list(b"What is the pass key?")])
    with torch.no_grad():
        want, _ = model(torch.cat([torch.tensor([list(data)]), probe], dim=1))
        got, _ = model(probe, state)
    torch.testing.assert_close(got, want[:, -probe.shape[1] :], rtol=1e-4, atol=1e-5)
    ingest([str(files[2])], _cfg(root))  # append later
    appended, _ = load_context(root / "ctx", model)
    assert appended.pos == len(data) + files[2].stat().st_size


def test_interrupted_ingest_resumes(setup, monkeypatch) -> None:
    root, files = setup
    whole = ingest([str(f) for f in files], _cfg(root, context=str(root / "whole")))
    calls = {"n": 0}
    real_save = ingest_module._save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ingest_module, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        ingest([str(f) for f in files], _cfg(root))
    monkeypatch.setattr(ingest_module, "_save", real_save)
    ingest([str(f) for f in files], _cfg(root))
    model = load_checkpoint(root / "ckpt").model
    a, _ = load_context(root / "ctx", model)
    b, _ = load_context(root / "whole", model)
    assert a.pos == b.pos == whole["position"]
    torch.testing.assert_close(a.blocks[0].ssm, b.blocks[0].ssm)
    torch.testing.assert_close(a.memory.store.keys, b.memory.store.keys)


def test_refuses_other_model_and_damage(setup) -> None:
    root, files = setup
    ingest([str(files[0])], _cfg(root))
    torch.manual_seed(1)
    other = HorizonLM(HorizonConfig.preset("tiny", memory_capacity=4096))
    with pytest.raises(HorizonError, match="another model"):
        load_context(root / "ctx", other)
    store_file = root / "ctx" / "memory.safetensors"
    store_file.write_bytes(store_file.read_bytes()[:-3] + b"xyz")
    with pytest.raises(HorizonError, match="damaged"):
        load_context(root / "ctx", load_checkpoint(root / "ckpt").model)


def test_generate_continues_from_context(setup, capsys) -> None:
    root, files = setup
    ingest([str(files[0])], _cfg(root))
    assert main(["generate", "--checkpoint", str(root / "ckpt"), "--context", str(root / "ctx"), "--prompt",
                 "The pass key is", "--tokens", "8", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The pass key is")


def _greedy(model, state, prompt: str, tokens: int = 40) -> list[int]:
    from horizonlm.data.tokenizers import ByteTokenizer
    from horizonlm.generate import GenerateConfig, generate

    cfg = GenerateConfig(prompt=prompt, tokens=tokens, temperature=0.0, device="cpu")
    return generate(model, ByteTokenizer(), cfg, torch.device("cpu"), state=state)


def test_generate_from_context_equals_one_stream(setup) -> None:
    """Greedy continuation after a saved context (loaded as ``horizon generate --context``
    loads it) equals the continuation after feeding the same text and the prompt in one stream;
    and differs from the prompt alone, so the test sees it if the context were ignored (weights
    drawn larger than at initialisation, so that a random model's greedy text follows its input)."""
    root, files = setup
    torch.manual_seed(0)
    sharp = HorizonLM(HorizonConfig.preset("tiny", memory_capacity=4096, init_std=0.3))
    save_checkpoint(root / "sharp", 1, sharp, {"tokenizer": {"kind": "byte"}})
    ingest([str(f) for f in files[:2]], _cfg(root, checkpoint=str(root / "sharp")))
    model = load_checkpoint(root / "sharp").model.eval()
    state, _ = load_context(root / "ctx", model, "cpu")
    prompt = "What is the pass key?"
    text = b"".join(f.read_bytes() for f in files[:2]).decode()
    from_context = _greedy(model, state, prompt)
    one_stream = _greedy(model, None, text + prompt)
    assert from_context == one_stream
    assert _greedy(model, None, prompt) != from_context


def test_kill_during_save_keeps_previous(setup) -> None:
    root, files = setup
    ingest([str(files[0])], _cfg(root))
    script = textwrap.dedent(f"""
        import os
        from horizonlm import context, ingest
        real = context.sha256_file
        def dying(path):
            if str(path).endswith("memory.safetensors"):
                os._exit(137)  # killed with the new state written and the memory half done
            return real(path)
        context.sha256_file = dying
        ingest.ingest([{str(files[1])!r}], ingest.IngestConfig(checkpoint={str(root / 'ckpt')!r},
                      context={str(root / 'ctx')!r}, window=50, save_every=10**9, device="cpu", progress=False))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 137, result.stderr
    state, manifest = load_context(root / "ctx", load_checkpoint(root / "ckpt").model)
    assert state.pos == files[0].stat().st_size


def test_pair_memory_context_equals_one_stream(setup) -> None:
    """A pair-mode memory with a key span saves the key its next entry takes and the inputs its
    filter reaches back to beside the store: a context ingested in windows that end mid-chunk,
    reloaded, continues exactly as one stream, and the probe's first entry takes the carried key
    (zeros, were it dropped)."""
    root, files = setup
    torch.manual_seed(0)
    pair = HorizonLM(HorizonConfig.preset("tiny", memory_capacity=4096, memory_key_span=4, init_std=0.3))
    save_checkpoint(root / "pair", 1, pair, {"tokenizer": {"kind": "byte"}})
    ingest([str(f) for f in files[:2]], _cfg(root, checkpoint=str(root / "pair"), window=37))
    model = load_checkpoint(root / "pair").model.eval()
    state, _ = load_context(root / "ctx", model)
    data = b"".join(f.read_bytes() for f in files[:2])
    probe = torch.tensor([list(b"What is the pass key?")])
    with torch.no_grad():
        want, want_state = model(torch.cat([torch.tensor([list(data)]), probe], dim=1))
        got, got_state = model(probe, state)
    torch.testing.assert_close(got, want[:, -probe.shape[1] :], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_state.memory.last_key, want_state.memory.last_key, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_state.memory.tail, want_state.memory.tail, rtol=1e-5, atol=1e-6)
    # The probe's first entry is keyed by the context's last byte: the carried key, not zeros.
    first = got_state.memory.store.keys[len(data)]  # (Dk,)
    torch.testing.assert_close(first, want_state.memory.keys[0, len(data)], rtol=1e-5, atol=1e-6)
    assert first.norm() > 0.5
