"""The `horizon` command end to end on a tiny model: clear errors and non-zero exits."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from horizonlm import HorizonConfig, HorizonLM
from horizonlm.checkpoint import save_checkpoint
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
    (["prepare", "text", "--source", "/nonexistent"], "--source for text: /nonexistent not found"),
    (["prepare", "enwik8"], "needs --source"),
    (["train", "--data", "/nonexistent"], "horizon prepare"),
    (["train", "--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    (["eval", "--checkpoint", "/nonexistent"], "no checkpoint"),
    (["generate", "--checkpoint", "/nonexistent"], "no checkpoint"),
    (["generate", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["train", "--config", "/nonexistent.yaml"], "--config: /nonexistent.yaml not found"),
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


def _text_data(root: Path, name: str, text: str) -> Path:
    """Prepared byte-level data of ``text`` (a `text` corpus of one file) in ``root/name``."""
    source = root / f"{name}-source"
    source.mkdir()
    (source / "a.txt").write_text(text)
    assert main(["prepare", "text", "--source", str(source), "--out", str(root / name), "--no-progress"]) == 0
    return root / name


def test_eval_scores_the_checkpoints_own_data_and_warns_on_other_data(run_dir: Path, tmp_path: Path, monkeypatch,
                                                                     capsys) -> None:
    """Issue 13.1: without --data, eval scores the data the model was trained on (here there is no
    runs/data/shakespeare to fall back on); other data is scored with a warning."""
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--checkpoint", str(run_dir / "run"), "--split", "valid", "--max-tokens", "300",
                 "--no-progress"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["source"] == f"{(run_dir / 'data').resolve()}:valid" and "warning" not in out.err
    assert report["tokens"] == 300 and report["split_tokens"] == 55_768  # --max-tokens caps the scored tokens
    other = _text_data(tmp_path, "other", "Other words, another book entirely. " * 400)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_dir / "run"), "--data", str(other), "--max-tokens", "100",
                 "--no-progress"]) == 0
    assert "is not the data this model was trained on" in capsys.readouterr().err


def test_resume_takes_the_saved_settings_and_refuses_other_ones(run_dir: Path, tmp_path: Path, capsys) -> None:
    """Issue 13.7: --resume reads the run's config.json; only steps, budget, eval and saving may change."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(run_dir / "data"), "--out", str(run), "--preset", "tiny", "--batch-size", "2",
                 "--seq-len", "16", "--steps", "6", "--lr", "0.003", "--eval-tokens", "50", "--eval-window", "32",
                 "--no-progress", "--stop-after", "3"]) == 0
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.01"]) == 2
    assert "--lr (saved 0.003, now 0.01)" in capsys.readouterr().err
    other = _text_data(tmp_path, "other", "Other words, another book entirely. " * 400)
    assert main(["train", "--out", str(run), "--resume", "--data", str(other)]) == 2
    assert "is not the data this run was trained on" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume"]) == 0
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    saved = json.loads((run / "config.json").read_text())
    assert (saved["lr"], saved["seq_len"], saved["preset"]) == (0.003, 16, "tiny")
    assert main(["train", "--out", str(run), "--resume", "--steps", "7", "--eval-tokens", "20"]) == 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000007"


def test_default_run_folder_follows_the_data() -> None:
    """Issue 13.2: training on other data never lands in the demo's run folder by default."""
    from horizonlm.train import TrainConfig

    assert TrainConfig().out == "runs/shakespeare"
    assert TrainConfig(data="runs/data/novels").out == "runs/novels"


NUMERIC_BAD = {
    "train": {"batch_size": ["0"], "seq_len": ["0"], "steps": ["0"], "max_minutes": ["-1", "nan", "inf"],
              "retrieval_every": ["-1"], "retrieval_rate": ["1.5"], "retrieval_weight": ["0"],
              "retrieval_same_window": ["-0.1"], "retrieval_cloze": ["-0.1", "1.5"], "retrieval_keys": ["0", "9"],
              "reset_every": ["-1"],
              "stop_after": ["-1"], "lr": ["0", "nan"], "ssm_lr": ["-1"], "min_lr_ratio": ["2"], "warmup": ["-1"],
              "kernel_warmup": ["-1"],
              "weight_decay": ["-1"], "beta2": ["1"], "grad_clip": ["-1"], "eval_every": ["-1"],
              "eval_tokens": ["-1"], "eval_window": ["0"], "save_every": ["-1"], "seed": ["-1"],
              "reset_stream_every": ["-1"], "memory_read_dropout": ["-0.1", "1.5"]},
    "eval": {"window": ["0"], "reset_every": ["-1", "3"], "max_tokens": ["-1"]},
    "generate": {"tokens": ["-1"], "temperature": ["-1", "nan", "inf"], "top_k": ["-1"], "top_p": ["0", "1.5"],
                 "seed": ["-1"], "window": ["0"]},
    "passkey": {"trials": ["0"], "keys": ["0"], "seed": ["-1"], "window": ["0"], "max_length": ["-1"], "batch": ["0"],
                "read_topk": ["-1"], "memory_capacity": ["-1"]},
    "prepare shakespeare": {"bpe_vocab": ["256"]},
}


def test_every_numeric_setting_has_a_bad_value_tested() -> None:
    from horizonlm.data.prepare import PrepareConfig
    from horizonlm.evaluate import EvalConfig
    from horizonlm.generate import GenerateConfig
    from horizonlm.passkey import PasskeyConfig
    from horizonlm.train import TrainConfig

    classes = {"train": TrainConfig, "eval": EvalConfig, "generate": GenerateConfig, "passkey": PasskeyConfig,
               "prepare shakespeare": PrepareConfig}
    for command, cls in classes.items():
        numeric = {f.name for f in dataclasses.fields(cls) if f.type in ("int", "float", int, float)}
        assert numeric == set(NUMERIC_BAD[command]), command


@pytest.mark.parametrize("command,name,value", [(c, n, v) for c, flags in NUMERIC_BAD.items()
                                                for n, values in flags.items() for v in values])
def test_every_numeric_flag_is_validated(command: str, name: str, value: str, capsys) -> None:
    """Issue 13.5: a negative budget, a zero window and so on are refused, naming the flag."""
    flag = "--" + name.replace("_", "-")
    assert main([*command.split(), flag, value]) == 2
    assert capsys.readouterr().err.startswith(f"horizon {command.split()[0]}: error: {flag} ")


@pytest.mark.parametrize("argv,message", [
    (["train", "--model-overrides", '{"bogus": 1}'],
     "--model-overrides: 'bogus' is not a setting of the horizon model"),
    (["train", "--model-overrides", '{"d_model": -4}'], "--model-overrides: invalid model settings"),
    (["train", "--preset", "huge"], "--preset must be one of tiny, cpu, small, base, got 'huge'"),
    (["train", "--resume", "--overwrite"], "--overwrite starts the run again and --resume continues it"),
    (["prepare", "text"], "needs --source: a folder of UTF-8 text files"),
    (["eval", "--split", "dev"], "--split must be one of train, valid, test, got 'dev'"),
    (["generate", "--prompt", "a", "--prompt-file", "b"], "--prompt-file: give the prompt as text or as a file"),
])
def test_errors_name_the_flag_in_the_users_words(argv, message, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "__init__" not in err and "Traceback" not in err


def test_a_bad_json_flag_says_what_is_expected(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model-overrides", "{bad"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--model-overrides: expected a JSON object" in err
    assert "_parse_mapping" not in err


def test_folders_and_files_are_told_apart(run_dir: Path, tmp_path: Path, capsys) -> None:
    """A folder given where a file is wanted (and the reverse) is said so, not 'not found'."""
    a_file = tmp_path / "a.txt"
    a_file.write_text("hello")
    cases = [
        (["eval", "--checkpoint", str(run_dir / "run"), "--text", str(tmp_path)], f"--text: {tmp_path} is a folder"),
        (["prepare", "enwik8", "--source", str(tmp_path)], f"{tmp_path} is a folder; give a file"),
        (["prepare", "text", "--source", str(a_file)], f"{a_file} is a file; give a folder"),
        (["train", "--config", str(tmp_path)], f"--config: {tmp_path} is a folder"),
        (["passkey", "--checkpoint", str(run_dir / "run"), "--haystack", str(tmp_path), "--out",
          str(tmp_path / "p.json")], f"--haystack: {tmp_path} is a folder"),
        (["ingest", str(tmp_path), "--checkpoint", str(run_dir / "run"), "--context", str(tmp_path / "ctx")],
         f"{tmp_path} is a folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_yaml_typos_and_values_are_reported_by_name(tmp_path: Path, capsys) -> None:
    (tmp_path / "typo.yaml").write_text("stpes: 3\n")
    assert main(["train", "--config", str(tmp_path / "typo.yaml")]) == 2
    assert "'stpes' is not a setting of this command (did you mean 'steps'?)" in capsys.readouterr().err
    (tmp_path / "zero.yaml").write_text("seq_len: 0\nlr: 6e-3\n")  # YAML reads 6e-3 as text; taken as a number
    assert main(["train", "--config", str(tmp_path / "zero.yaml")]) == 2
    assert f"--seq-len must be >= 1, got 0 (set in {tmp_path / 'zero.yaml'})" in capsys.readouterr().err
    (tmp_path / "kind.yaml").write_text("steps: many\n")
    assert main(["train", "--config", str(tmp_path / "kind.yaml")]) == 2
    assert "steps must be a whole number, got 'many'" in capsys.readouterr().err


def test_prompt_files_are_checked_and_echoed(run_dir: Path, tmp_path: Path, capsys) -> None:
    """An empty prompt is refused, a binary prompt file is fed with a warning to a byte-level
    model and refused by a word-level one, and the prompt read from a file is echoed."""
    run = str(run_dir / "run")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("ROMEO: hello")
    assert main(["generate", "--checkpoint", run, "--prompt-file", str(prompt), "--tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO: hello")
    (tmp_path / "empty.txt").write_text("")
    assert main(["generate", "--checkpoint", run, "--prompt-file", str(tmp_path / "empty.txt")]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", run]) == 2
    assert "give a prompt" in capsys.readouterr().err
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main(["generate", "--checkpoint", run, "--prompt-file", str(binary), "--tokens", "2"]) == 0
    assert "does not look like text (it holds NUL bytes" in capsys.readouterr().err
    words = ["<eos>", "<unk>", "a", "b"]
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "words", 1, HorizonLM(HorizonConfig.preset("tiny", vocab_size=len(words))),
                    {"tokenizer": {"kind": "word", "words": words}})
    assert main(["generate", "--checkpoint", str(tmp_path / "words"), "--prompt-file", str(binary)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_ingest_warns_about_binary_input(run_dir: Path, tmp_path: Path, capsys) -> None:
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    assert main(["ingest", str(binary), "--checkpoint", str(run_dir / "run"), "--context", str(tmp_path / "ctx"),
                 "--device", "cpu", "--no-progress"]) == 0
    assert "does not look like text" in capsys.readouterr().err


def test_every_flag_has_help() -> None:
    """Every option of every subcommand says what it does; eval --data names its default."""
    parser = build_parser()
    todo = [("horizon", parser)]
    while todo:
        name, p = todo.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", child) for sub, child in action.choices.items()]
            elif action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, f"{name} {action.option_strings[0]}"
    eval_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["eval"]
    data_help = next(a.help for a in eval_parser._actions if "--data" in a.option_strings)
    assert "default: the data the checkpoint was trained on" in data_help


def test_readme_test_command_prints_a_pass_count() -> None:
    """`python -m pytest -q tests` ends with 'N passed' (a second -q from the config would hide it)."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_cli.py::test_sampling_rules"], cwd=root, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and re.search(r"^1 passed", result.stdout, re.M), result.stdout


@pytest.mark.parametrize("argv,usage,message", [
    (["train", "--max-minute", "0.5"], "usage: horizon train",
     "unrecognized arguments: --max-minute (did you mean --max-minutes?) 0.5"),
    (["eval", "--chekpoint=runs/x"], "usage: horizon eval",
     "unrecognized arguments: --chekpoint=runs/x (did you mean --checkpoint?)"),
    (["bench", "speed", "--ouut", "x.json"], "usage: horizon bench speed", "(did you mean --out?)"),
    (["train", "--seq", "8"], "usage: horizon train", "unrecognized arguments: --seq"),
])
def test_a_flag_typo_is_told_by_its_command_with_the_flag_meant(argv, usage, message, capsys) -> None:
    """Issue 26 B6: no abbreviated flag is taken (``--max-minute`` is not ``--max-minutes``), and
    an unknown flag is reported with the subcommand's usage and the closest real flag."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and message in err


def test_passkey_warns_before_gpu_sized_prompts_on_a_cpu(capsys) -> None:
    """Issue 26 B8: the passkey defaults reach 1M-token prompts; on a CPU that is said first."""
    assert main(["passkey", "--checkpoint", "/nonexistent", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "horizon passkey: warning: running on the CPU with prompts up to 1,048,576 tokens (10 cells" in err
    assert "--max-length 65536 skips them" in err
    assert main(["passkey", "--checkpoint", "/nonexistent", "--device", "cpu", "--max-length", "65536"]) == 2
    assert "warning" not in capsys.readouterr().err
