"""The transformers bridge: an export loads with ``from_pretrained`` to identical logits,
``.generate()`` gives the tokens of ``horizon generate`` at temperature 0 and carries the state (a
fixed size for HorizonLM) as its cache, sampling settings behave, padded batches and bad folders
are clear errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from horizonlm import HorizonConfig  # noqa: E402
from horizonlm.checkpoint import load_checkpoint  # noqa: E402
from horizonlm.fileio import sha256_file  # noqa: E402
from horizonlm.data.tokenizers import BPETokenizer, ByteTokenizer  # noqa: E402
from horizonlm.generate import GenerateConfig, generate  # noqa: E402
from horizonlm.integrations import hf  # noqa: E402
from horizonlm.integrations.export import (  # noqa: E402
    ARCHITECTURES,
    CONFIG_FILE,
    WEIGHTS_FILE,
    export_folder,
    load_any,
)

from .conftest import HERE, checkpoint_of, tiny_model  # noqa: E402

PROMPT = "ROMEO:\nBut soft, what light"


def exported(tmp_path: Path, kind: str = "horizon", **overrides):
    """The model, its run folder and its export."""
    model = tiny_model(kind, **overrides)
    run = checkpoint_of(model, tmp_path / "run")
    return model, run, export_folder(run, tmp_path / "export")


def prompt_ids(text: str = PROMPT) -> torch.Tensor:
    return torch.tensor([ByteTokenizer().encode(text)])  # (1, T)


def test_config_fields_are_the_models() -> None:
    names = {f.name for f in dataclasses.fields(hf.HorizonLMConfig)}
    assert {f.name for f in dataclasses.fields(HorizonConfig)} <= names
    assert hf.HorizonLMConfig().model_config() == HorizonConfig()
    assert hf.HorizonLMConfig(d_model=48).hidden_size == 48
    with pytest.raises(ValueError, match="n_layers must be a positive integer"):
        hf.HorizonLMConfig(n_layers=0)


def test_round_trip_identical_logits(tmp_path: Path, kind: str) -> None:
    model, _, out = exported(tmp_path, kind)
    assert type(AutoConfig.from_pretrained(out)).__name__ in ("HorizonLMConfig", "HorizonTransformerConfig")
    hm = AutoModelForCausalLM.from_pretrained(out)
    assert type(hm).__name__ == ARCHITECTURES[kind]
    assert hm.config.model_config() == model.config
    assert hm.model.head.weight is hm.model.embed.weight
    x = torch.randint(0, 256, (2, 37))
    assert torch.equal(hm(x).logits, model(x)[0])
    out_loss = hm(x, labels=x)
    want = F.cross_entropy(model(x)[0][:, :-1].flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(out_loss.loss, want)
    hm.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / CONFIG_FILE).read_text())
    assert {k: saved[k] for k in model.config.to_dict()} == model.config.to_dict()
    assert torch.equal(load_any(tmp_path / "saved").model(x)[0], model(x)[0])
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")(x).logits, model(x)[0])


def test_an_export_saved_before_the_late_read_loads_without_it(tmp_path: Path) -> None:
    """A config.json without ``memory_late_read`` (exported before the field existed) loads the
    model it was, without the late read, through transformers and through ``load_any``."""
    model, _, out = exported(tmp_path, memory_late_read=False)
    config = json.loads((out / CONFIG_FILE).read_text())
    del config["memory_late_read"]
    (out / CONFIG_FILE).write_text(json.dumps(config))
    meta = json.loads((out / "checkpoint.json").read_text())  # as that export wrote it: no field, its hash
    del meta["config"]["memory_late_read"]
    meta["files"][CONFIG_FILE] = sha256_file(out / CONFIG_FILE)
    (out / "checkpoint.json").write_text(json.dumps(meta))
    hm = AutoModelForCausalLM.from_pretrained(out)
    assert hm.model.late_read is None and hm.config.model_config().has_late_read is False
    x = torch.randint(0, 256, (2, 37))
    assert torch.equal(hm(x).logits, model(x)[0])
    assert load_any(out).model.late_read is None


def test_autotokenizer(tmp_path: Path) -> None:
    _, _, out = exported(tmp_path)
    text = "Ünïcode ROMEO:\n\tthe end"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(text)["input_ids"] == ByteTokenizer().encode(text)
    assert tok.decode(ByteTokenizer().encode(text)) == text
    bpe = BPETokenizer.build((HERE / "data" / "shakespeare_rolling.jsonl").read_text(), 300)
    run = checkpoint_of(tiny_model(vocab_size=bpe.vocab_size), tmp_path / "bpe-run", bpe.spec())
    tok = AutoTokenizer.from_pretrained(export_folder(run, tmp_path / "bpe-export"))
    text = "KING RICHARD II:\nWhat says he now?"
    assert tok(text)["input_ids"] == bpe.encode(text)
    assert tok.decode(bpe.encode(text)) == bpe.decode(bpe.encode(text))


@pytest.mark.parametrize("window", [4096, 8])
def test_greedy_equals_horizon_generate(tmp_path: Path, kind: str, window: int) -> None:
    _, run, out = exported(tmp_path, kind)
    hm = AutoModelForCausalLM.from_pretrained(out)
    hm.prefill_window = window
    ids = prompt_ids()
    got = hm.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    cfg = GenerateConfig(checkpoint=str(run), prompt=PROMPT, tokens=24, temperature=0, window=window, device="cpu")
    assert got == generate(load_checkpoint(run).model, ByteTokenizer(), cfg, torch.device("cpu"))


def test_cache_is_the_state(tmp_path: Path, kind: str) -> None:
    """A long prompt goes into the state: HorizonLM's cache is as big after 256 prompt tokens as
    after 64 (the tiny memory is full after 48), the baseline's grows."""
    _, _, out = exported(tmp_path, kind)
    hm = AutoModelForCausalLM.from_pretrained(out)
    gen = torch.Generator().manual_seed(0)
    sizes = []
    for n in (64, 256):
        ids = torch.randint(0, 256, (1, n), generator=gen)  # (1, n)
        res = hm.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        assert isinstance(res.cache, hf.RecurrentCache)
        assert res.cache.get_seq_length() == n + 3  # the last sampled token is not fed
        sizes.append(res.cache.nbytes())
    if kind == "horizon":
        assert sizes[0] == sizes[1]
    else:
        assert sizes[1] > sizes[0]


def test_sampling_settings(tmp_path: Path) -> None:
    _, _, out = exported(tmp_path)
    hm = AutoModelForCausalLM.from_pretrained(out)
    ids = prompt_ids()

    def new_tokens(**kwargs) -> list[int]:
        return hm.generate(ids, max_new_tokens=12, **kwargs)[0, ids.shape[1]:].tolist()

    greedy = new_tokens(do_sample=False)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(new_tokens(do_sample=True, temperature=0.7, top_k=20, top_p=0.9))
    assert runs[0] == runs[1] and len(runs[0]) == 12
    assert new_tokens(do_sample=True, top_k=1) == greedy
    eos = greedy[4]
    assert new_tokens(do_sample=False, eos_token_id=eos) == greedy[: greedy.index(eos) + 1]


def test_batches(tmp_path: Path, kind: str) -> None:
    _, _, out = exported(tmp_path, kind)
    hm = AutoModelForCausalLM.from_pretrained(out)
    rows = torch.cat([prompt_ids("ROMEO:\nAy me"), prompt_ids("JULIET:\nO Ro")])  # (2, 12)
    batched = hm.generate(rows, max_new_tokens=10, do_sample=False)
    for row, got in zip(rows, batched):
        assert torch.equal(hm.generate(row[None], max_new_tokens=10, do_sample=False)[0], got)
    mask = torch.ones_like(rows)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="cannot take a padded batch"):
        hm.generate(rows, attention_mask=mask, max_new_tokens=2)


def test_cache_given_to_generate_and_beams(tmp_path: Path) -> None:
    _, _, out = exported(tmp_path)
    hm = AutoModelForCausalLM.from_pretrained(out)
    ids = prompt_ids()
    want = hm.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(hm.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False), want)
    cache = hm(ids[:, :-5], use_cache=True).cache
    assert torch.equal(hm.generate(ids, cache=cache, max_new_tokens=10, do_sample=False), want)
    beams = hm.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(hm.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False), beams)


def test_bad_folders(tmp_path: Path) -> None:
    _, _, out = exported(tmp_path)
    values = json.loads((out / CONFIG_FILE).read_text())

    def variant(name: str, config: dict, weights: bool = True) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / CONFIG_FILE).write_text(json.dumps(config))
        if weights:
            (folder / WEIGHTS_FILE).write_bytes((out / WEIGHTS_FILE).read_bytes())
        return folder

    with pytest.raises(OSError, match="model.safetensors"):
        hf.HorizonLMForCausalLM.from_pretrained(variant("no-weights", values, weights=False))
    with pytest.raises(ValueError, match="type 'llama'"):
        hf.HorizonLMForCausalLM.from_pretrained(variant("llama", {**values, "model_type": "llama"}))
    with pytest.raises((ValueError, RuntimeError)):  # transformers reports the shapes that differ
        hf.HorizonLMForCausalLM.from_pretrained(variant("wider", {**values, "d_model": 48}))
    with pytest.raises(ValueError, match="do not fit the config.*missing_keys"):
        hf.HorizonLMForCausalLM.from_pretrained(variant("untied", {**values, "tie_embeddings": False}))
    with pytest.raises(ValueError, match="n_layers must be a positive integer"):
        AutoModelForCausalLM.from_pretrained(variant("invalid", {**values, "n_layers": 0}))
