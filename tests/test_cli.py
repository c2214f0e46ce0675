"""The `horizon` command end to end on a tiny model: clear errors and non-zero exits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from horizonlm.cli import build_parser, main
from horizonlm.generate import sample_next


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    assert main(["prepare", "shakespeare", "--out", str(root / "data")]) == 0
    (root / "train.yaml").write_text(
        f"data: {root / 'data'}\nout: {root / 'run'}\npreset: tiny\nbatch_size: 2\nseq_len: 16\nsteps: 3\n"
        "eval_tokens: 100\neval_window: 32\nprogress: false\n")
    assert main(["train", "--config", str(root / "train.yaml"), "--steps", "4"]) == 0
    return root


def test_train_writes_log_and_checkpoint(run_dir: Path) -> None:
    records = [json.loads(x) for x in (run_dir / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # the flag overrode the YAML
    assert (run_dir / "run" / "checkpoints" / "latest").read_text().strip() == "step-00000004"


def test_eval_split_and_text(run_dir: Path, capsys) -> None:
    assert main(["eval", "--checkpoint", str(run_dir / "run"), "--data", str(run_dir / "data"), "--split", "valid",
                 "--window", "512"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == 55_768 and 4 < report["bits_per_byte"] < 9
    text = run_dir / "t.tokens"
    text.write_text(" a b c \n \n d e \n")
    assert main(["eval", "--checkpoint", str(run_dir / "run"), "--text", str(text), "--wikitext-words"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["words"] == 5 + 3 and report["tokens"] == len(text.read_bytes()) - 1
    assert report["word_perplexity"] == pytest.approx(2 ** (report["total_nats"] / 0.6931471805599453 / 8), rel=1e-9)


def test_generate_is_seeded_and_streams(run_dir: Path, capsys) -> None:
    args = ["generate", "--checkpoint", str(run_dir / "run"), "--prompt", "ROMEO:", "--tokens", "20", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("ROMEO:")
    prompt = run_dir / "prompt.txt"
    prompt.write_text("x" * 5000)
    assert main(["generate", "--checkpoint", str(run_dir / "run"), "--prompt-file", str(prompt), "--tokens", "5",
                 "--window", "1000"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["prepare", "text", "--source", "/nonexistent"], "not a folder"),
    (["prepare", "enwik8"], "needs --source"),
    (["train", "--data", "/nonexistent"], "horizon prepare"),
    (["train", "--seq-len", "0"], "seq_len"),
    (["eval", "--checkpoint", "/nonexistent"], "no checkpoint"),
    (["generate", "--checkpoint", "/nonexistent"], "no checkpoint"),
    (["generate", "--top-p", "0"], "top_p"),
    (["train", "--config", "/nonexistent.yaml"], "not found"),
])
def test_bad_input_exits_non_zero(argv, message, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_every_subcommand_has_help() -> None:
    parser = build_parser()
    for name in ("prepare", "train", "eval", "generate", "demo", "ingest", "passkey", "bench speed", "bench memory",
                 "bench quality"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([*name.split(), "--help"])
        assert exit_info.value.code == 0


def test_sampling_rules() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert sample_next(logits, 0.0, 0, 1.0, g).item() == 1
    assert all(sample_next(logits, 1.0, 1, 1.0, g).item() == 1 for _ in range(20))
    assert all(sample_next(logits, 1.0, 0, 0.01, g).item() == 1 for _ in range(20))
    assert {sample_next(logits, 1.0, 2, 1.0, g).item() for _ in range(50)} == {1, 3}
