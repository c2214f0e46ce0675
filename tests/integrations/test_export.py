"""``horizon export`` and loading its folders, without transformers: atomic, refuses to overwrite,
the folder loads back to the same logits and tokenizer, bad folders are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from horizonlm.cli import main
from horizonlm.data.tokenizers import BPETokenizer, ByteTokenizer, WordTokenizer
from horizonlm.errors import HorizonError
from horizonlm.integrations.export import (
    CONFIG_FILE,
    MODEL_TYPES,
    WEIGHTS_FILE,
    byte_tokenizer_json,
    export_folder,
    load_any,
    spec_from_tokenizer_json,
)

from .conftest import checkpoint_of, tiny_model


def test_export_loads_back_identical(tmp_path: Path, kind: str) -> None:
    model = tiny_model(kind)
    out = export_folder(checkpoint_of(model, tmp_path / "run"), tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]  # no temporary folder left
    values = json.loads((out / CONFIG_FILE).read_text())
    assert values["model_type"] == MODEL_TYPES[kind]
    assert {k: values[k] for k in model.config.to_dict()} == model.config.to_dict()
    loaded = load_any(out)
    assert loaded.info["kind"] == kind and loaded.info["tokenizer"] == {"kind": "byte"}
    x = torch.randint(0, 256, (2, 19))
    assert torch.equal(loaded.model(x)[0], model(x)[0])
    assert loaded.model.head.weight is loaded.model.embed.weight  # tying survives


def test_export_refuses_to_overwrite(tmp_path: Path) -> None:
    run = checkpoint_of(tiny_model(), tmp_path / "run")
    out = export_folder(run, tmp_path / "export")
    with pytest.raises(HorizonError, match="already exists.*--overwrite"):
        export_folder(run, out)
    other = tiny_model(seed=1)
    export_folder(checkpoint_of(other, tmp_path / "run2"), out, overwrite=True)
    x = torch.randint(0, 256, (1, 9))
    assert torch.equal(load_any(out).model(x)[0], other(x)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run", "run2"]


def test_cli_export(tmp_path: Path, capsys) -> None:
    run = checkpoint_of(tiny_model(), tmp_path / "run")
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "export")]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "export")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "export"), "--overwrite"]) == 0


def test_tokenizer_specs_round_trip(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    text = "Ünïcode, tabs\tand\nnewlines: ROMEO! \x00\xff"
    byte_tok = Tokenizer.from_str(byte_tokenizer_json())
    assert byte_tok.encode(text).ids == ByteTokenizer().encode(text)
    assert byte_tok.decode(ByteTokenizer().encode(text)) == text
    assert spec_from_tokenizer_json(byte_tokenizer_json()) == {"kind": "byte"}
    bpe = BPETokenizer.build((Path(__file__).parent / "data" / "shakespeare_rolling.jsonl").read_text(), 300)
    assert spec_from_tokenizer_json(bpe.spec()["json"]) == bpe.spec()
    model = tiny_model(vocab_size=bpe.vocab_size)
    out = export_folder(checkpoint_of(model, tmp_path / "run", bpe.spec()), tmp_path / "export")
    assert load_any(out).info["tokenizer"] == bpe.spec()
    word = WordTokenizer.build("a b c\n")
    with pytest.raises(HorizonError, match="word-level tokenizer cannot be exported"):
        export_folder(checkpoint_of(tiny_model(vocab_size=word.vocab_size), tmp_path / "w", word.spec()),
                      tmp_path / "w-export")
    assert not (tmp_path / "w-export").exists()


def test_bad_folders(tmp_path: Path) -> None:
    out = export_folder(checkpoint_of(tiny_model(), tmp_path / "run"), tmp_path / "export")
    values = json.loads((out / CONFIG_FILE).read_text())

    def variant(name: str, config: dict | None = None, weights: bool = True) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / CONFIG_FILE).write_text(json.dumps(values if config is None else config))
        if weights:
            (folder / WEIGHTS_FILE).write_bytes((out / WEIGHTS_FILE).read_bytes())
        return folder

    with pytest.raises(HorizonError, match="has no model.safetensors"):
        load_any(variant("no-weights", weights=False))
    with pytest.raises(HorizonError, match="type 'llama'"):
        load_any(variant("llama", {**values, "model_type": "llama"}))
    with pytest.raises(HorizonError, match="do not fit its config"):
        load_any(variant("wider", {**values, "d_model": 48}))
    with pytest.raises(HorizonError, match="lacks the horizon config fields n_layers"):
        load_any(variant("old", {k: v for k, v in values.items() if k != "n_layers"}))
    with pytest.raises(HorizonError, match="invalid horizon config"):
        load_any(variant("invalid", {**values, "n_layers": 0}))
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(HorizonError, match="not valid JSON"):
        load_any(tmp_path / "garbled")


def test_every_command_loader_accepts_an_export(tmp_path: Path, capsys) -> None:
    """``load_checkpoint`` (what eval, generate, ingest and passkey use) takes an exported folder,
    and refuses to resume training from one; ``horizon generate`` runs on it."""
    from horizonlm.checkpoint import load_checkpoint

    model = tiny_model()
    out = export_folder(checkpoint_of(model, tmp_path / "run"), tmp_path / "export")
    x = torch.randint(0, 256, (1, 11))
    assert torch.equal(load_checkpoint(out).model(x)[0], model(x)[0])
    with pytest.raises(HorizonError, match="no training state"):
        load_checkpoint(out, with_train_state=True)
    assert main(["generate", "--checkpoint", str(out), "--prompt", "To be", "--tokens", "5", "--temperature", "0"]) == 0


def test_a_training_run_folder_is_not_an_export(tmp_path: Path) -> None:
    """A run folder holds a config.json of training settings beside checkpoints/: it is loaded as a
    checkpoint, not mistaken for an exported model."""
    from horizonlm.checkpoint import load_checkpoint
    from horizonlm.integrations.export import is_export

    model = tiny_model()
    run_folder = tmp_path / "run"
    checkpoint_of(model, run_folder / "checkpoints")
    (run_folder / "config.json").write_text(json.dumps({"lr": 0.001, "preset": "tiny"}))
    assert not is_export(run_folder)
    x = torch.randint(0, 256, (1, 7))
    assert torch.equal(load_checkpoint(run_folder).model(x)[0], model(x)[0])


def test_an_export_is_a_checkpoint_the_core_loads_alone(tmp_path: Path) -> None:
    """Issue 26 A: ``horizon export`` writes a checkpoint.json over the Hugging Face files, so the
    core's own loader reads the folder (weights under the recorded prefix, checksummed) without
    importing this integration; a foreign folder without one is pointed at ``horizon export``."""
    from horizonlm.checkpoint import load_checkpoint

    model = tiny_model()
    out = export_folder(checkpoint_of(model, tmp_path / "run"), tmp_path / "export")
    info = json.loads((out / "checkpoint.json").read_text())
    assert info["weight_prefix"] == "model." and info["exported"] and info["step"] == 1
    assert sorted(info["files"]) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert "optimizer" not in info and "carried_states" not in info
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (foreign / name).write_bytes((out / name).read_bytes())
    with pytest.raises(HorizonError, match="checkpoint.json not found.*horizon export --checkpoint"):
        load_checkpoint(foreign)
    x = torch.randint(0, 256, (1, 9))
    assert torch.equal(load_any(foreign).model(x)[0], model(x)[0])  # this integration still reads it
    converted = export_folder(foreign, tmp_path / "converted")
    assert torch.equal(load_checkpoint(converted).model(x)[0], model(x)[0])
    (out / "config.json").write_text((out / "config.json").read_text().replace('"d_model": 32', '"d_model": 48'))
    with pytest.raises(HorizonError, match="config.json is damaged"):
        load_checkpoint(out)


def test_every_command_that_takes_a_checkpoint_takes_an_export(tmp_path: Path, capsys) -> None:
    """Issue 26 B7: the export records the data its model was trained on, so ``horizon eval
    --checkpoint EXPORT`` scores it as on the run; generate, ingest and passkey run on it too."""
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", "shakespeare", "--out", str(data), "--no-progress"]) == 0
    assert main(["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--batch-size", "2",
                 "--seq-len", "16", "--steps", "2", "--eval-tokens", "64", "--eval-window", "32",
                 "--no-progress"]) == 0
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    reports = []
    for folder in (run, out):
        assert main(["eval", "--checkpoint", str(folder), "--split", "valid", "--max-tokens", "300",
                     "--no-progress"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0]["source"] == reports[1]["source"] == f"{data.resolve()}:valid"
    assert reports[0]["bits_per_byte"] == pytest.approx(reports[1]["bits_per_byte"], rel=1e-6)
    assert main(["generate", "--checkpoint", str(out), "--prompt", "To be", "--tokens", "5"]) == 0
    text = tmp_path / "book.txt"
    text.write_text("ROMEO: a line of text to read into a saved context.\n" * 4)
    assert main(["ingest", "--checkpoint", str(out), "--context", str(tmp_path / "ctx"), "--no-progress",
                 str(text)]) == 0
    haystack = tmp_path / "hay.txt"
    haystack.write_text("the grass is green and the sky is blue. " * 60)
    assert main(["passkey", "--checkpoint", str(out), "--haystack", str(haystack), "--lengths", "300",
                 "--depths", "50", "--trials", "1", "--out", str(tmp_path / "pk.json"), "--no-progress"]) == 0
