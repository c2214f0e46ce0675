"""The ``horizon`` command. Flags are generated from the config dataclasses (help text from the
field docstrings); ``--config FILE.yaml`` supplies defaults that explicit flags override."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from horizonlm.devices import resolve_device
from horizonlm.errors import HorizonError


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its docstring)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _parse_mapping(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{docs.get(f.name, '')} (default: {default!r})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        elif kind in (int, float, str):
            parser.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(kind) is dict:
            parser.add_argument(flag, dest=f.name, type=_parse_mapping, default=argparse.SUPPRESS,
                                help=help_text + " as JSON")
        else:
            raise TypeError(f"no flag type for {cls.__name__}.{f.name}: {kind}")


def build_config(cls: type, args: argparse.Namespace) -> Any:
    """Dataclass defaults, then the YAML file, then explicit flags."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise HorizonError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise HorizonError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise HorizonError(f"config file {path} must hold a mapping of settings")
        values.update(loaded)
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    unknown = sorted(set(values) - names)
    if unknown:
        raise HorizonError(f"unknown {cls.__name__} settings: {', '.join(unknown)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise HorizonError(str(err)) from err


def cmd_prepare(args: argparse.Namespace) -> int:
    from horizonlm.data.prepare import prepare

    out = args.out or f"runs/data/{args.name}"
    meta = prepare(args.name, out, source=args.source, tokenizer=args.tokenizer, bpe_vocab=args.bpe_vocab)
    sizes = ", ".join(f"{k} {v['tokens']:,} tokens" for k, v in meta["splits"].items())
    print(f"prepared {args.name} in {out}: {meta['tokenizer']['kind']} tokenizer, vocabulary {meta['vocab_size']}, {sizes}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from horizonlm.train import TrainConfig, train

    summary = train(build_config(TrainConfig, args))
    if summary.get("parameters") is not None and summary["valid"]:
        last = summary["valid"][-1]
        print(f"trained to step {summary['step']} in {summary['train_seconds']:.0f} s; "
              f"valid {last['valid_bits_per_byte']:.4f} bits/byte; checkpoint in {summary['checkpoint']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from horizonlm.checkpoint import load_checkpoint
    from horizonlm.data.stream import load_meta, open_split
    from horizonlm.data.tokenizers import tokenizer_from_spec
    from horizonlm.evaluate import evaluate_tokens, wikitext_word_count, word_perplexity

    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.model.to(device)
    report: dict[str, Any] = {"checkpoint": str(ckpt.path)}
    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise HorizonError(f"{path} not found")
        raw = path.read_bytes()
        tokenizer = tokenizer_from_spec(ckpt.info["tokenizer"])
        if ckpt.info["tokenizer"]["kind"] == "byte":
            ids = np.frombuffer(raw, dtype=np.uint8)
        else:
            ids = np.asarray(tokenizer.encode(raw.decode("utf-8")), dtype=np.int64)
        result = evaluate_tokens(model, ids, args.window, device, bytes_per_token=len(raw) / max(1, len(ids)),
                                 reset_every=args.reset_every or None)
        report.update(source=str(path), **result)
        if args.wikitext_words:
            words = wikitext_word_count(raw.decode("utf-8"))
            report["words"] = words
            report["word_perplexity"] = word_perplexity(result["total_nats"], words)
    else:
        meta = load_meta(args.data)
        tokens = open_split(args.data, args.split, verify=True)
        info = meta["splits"][args.split]
        result = evaluate_tokens(model, tokens, args.window, device, bytes_per_token=info["bytes"] / info["tokens"],
                                 reset_every=args.reset_every or None)
        report.update(source=f"{args.data}:{args.split}", **result)
        if meta["tokenizer"]["kind"] == "word":
            report["word_perplexity"] = word_perplexity(result["total_nats"], result["tokens"])
    print(json.dumps(report, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from horizonlm.checkpoint import load_checkpoint
    from horizonlm.data.tokenizers import tokenizer_from_spec
    from horizonlm.generate import GenerateConfig, generate

    cfg = build_config(GenerateConfig, args)
    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(cfg.checkpoint)
    tokenizer = tokenizer_from_spec(ckpt.info["tokenizer"])

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    model = ckpt.model.to(device)
    state = None
    if cfg.context:
        from horizonlm.context import load_context

        state, _ = load_context(cfg.context, model, device)
    emit(cfg.prompt if not cfg.prompt_file else "")
    generate(model, tokenizer, cfg, device, emit, state)
    emit("\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Prepare the shipped Shakespeare, train the default model, score the test split, sample."""
    from horizonlm.bench.common import environment
    from horizonlm.checkpoint import load_checkpoint
    from horizonlm.data.prepare import prepare
    from horizonlm.data.stream import load_meta, open_split
    from horizonlm.data.tokenizers import tokenizer_from_spec
    from horizonlm.evaluate import evaluate_tokens
    from horizonlm.fileio import atomic_write_json
    from horizonlm.generate import GenerateConfig, generate
    from horizonlm.train import TrainConfig, train

    cfg = build_config(TrainConfig, args)
    prepare("shakespeare", cfg.data)
    summary = train(cfg)
    ckpt = load_checkpoint(Path(cfg.out) / "checkpoints")
    device = resolve_device(cfg.device)
    meta = load_meta(cfg.data)
    test = evaluate_tokens(ckpt.model.to(device), open_split(cfg.data, "test"), cfg.eval_window, device, progress=False)
    print("\n--- sample ---")
    gen = GenerateConfig(checkpoint=str(ckpt.path), prompt="ROMEO:\n", tokens=300, device=cfg.device)
    sys.stdout.write(gen.prompt)
    generate(ckpt.model, tokenizer_from_spec(meta["tokenizer"]), gen, device,
             lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    print("\n--------------")
    valid = summary["valid"][-1]["valid_bits_per_byte"] if summary["valid"] else None
    print(f"valid split: {valid:.4f} bits/byte; test split: {test['bits_per_byte']:.4f} bits/byte over "
          f"{test['tokens']:,} bytes (trained {summary['step']} steps, {summary['tokens_seen']:,} tokens, "
          f"{summary['train_seconds']:.0f} s)")
    print(f"checkpoint: {ckpt.path}")
    report = {"environment": environment(), "steps": summary["step"], "tokens_seen": summary["tokens_seen"],
              "train_seconds": summary["train_seconds"], "parameters": summary["parameters"],
              "valid_bits_per_byte": valid, "test_bits_per_byte": test["bits_per_byte"],
              "train_config": dataclasses.asdict(cfg)}
    atomic_write_json(Path(cfg.out) / "demo.json", report)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from horizonlm.ingest import IngestConfig, ingest

    result = ingest(args.files, build_config(IngestConfig, args))
    print(json.dumps(result, indent=2))
    return 0


def cmd_passkey(args: argparse.Namespace) -> int:
    from horizonlm.bench.common import environment
    from horizonlm.checkpoint import load_checkpoint
    from horizonlm.data.tokenizers import require_byte_level
    from horizonlm.passkey import (
        PasskeyConfig,
        load_haystack,
        plot_passkey,
        run_passkey,
        save_results,
    )

    cfg = build_config(PasskeyConfig, args)
    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(cfg.checkpoint)
    require_byte_level(ckpt.info.get("tokenizer", {}), f"passkey prompts are raw bytes; checkpoint {ckpt.path}")
    label = cfg.label or ckpt.info["kind"]
    env = environment()
    entry = run_passkey(ckpt.model.to(device), load_haystack(cfg), cfg, device, label,
                        on_cell=lambda partial: save_results(cfg.out, label, partial, env))
    plot_passkey(save_results(cfg.out, label, entry, env), Path(cfg.out).with_suffix(".png"))
    print(f"wrote {cfg.out} and {Path(cfg.out).with_suffix('.png')}")
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from horizonlm.bench.speed import SpeedConfig, run_speed

    cfg = build_config(SpeedConfig, args)
    run_speed(cfg)
    print(f"wrote {cfg.out} and {Path(cfg.out).with_suffix('.png')}")
    return 0


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from horizonlm.bench.memory import MemoryBenchConfig, run_memory_bench

    cfg = build_config(MemoryBenchConfig, args)
    run_memory_bench(cfg)
    print(f"wrote {cfg.out}")
    return 0


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from horizonlm.bench.quality import QualityConfig, run_quality

    cfg = build_config(QualityConfig, args)
    run_quality(cfg)
    print(f"wrote {cfg.out} and {Path(cfg.out).with_suffix('.png')}")
    return 0


def _config_command(sub, name: str, help_text: str, cls: type, func) -> argparse.ArgumentParser:
    """A subcommand whose flags are the fields of ``cls``, plus ``--config FILE.yaml``."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    add_dataclass_args(p, cls)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    from horizonlm.bench.memory import MemoryBenchConfig
    from horizonlm.bench.quality import QualityConfig
    from horizonlm.bench.speed import SpeedConfig
    from horizonlm.generate import GenerateConfig
    from horizonlm.ingest import IngestConfig
    from horizonlm.passkey import PasskeyConfig
    from horizonlm.train import TrainConfig

    parser = argparse.ArgumentParser(prog="horizon", description="HorizonLM: attention-free long-context language models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build memory-mapped token streams for a corpus")
    p.add_argument("name", help="shakespeare (shipped), novels, wikitext, enwik8 or text")
    p.add_argument("--source", help="folder or file to read (novels: ../shared/data/novels; wikitext: a folder; "
                                    "enwik8: enwik8 or enwik8.zip; text: a folder)")
    p.add_argument("--out", help="output folder (default runs/data/NAME)")
    p.add_argument("--tokenizer", choices=["byte", "word", "bpe"], help="default: byte (word for WikiText .tokens)")
    p.add_argument("--bpe-vocab", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    p.set_defaults(func=cmd_prepare)

    _config_command(sub, "train", "train a model on prepared data", TrainConfig, cmd_train)
    _config_command(sub, "demo", "prepare Shakespeare, train, score the test split and sample", TrainConfig, cmd_demo)

    p = sub.add_parser("eval", help="stream a split or a text file through a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    p.add_argument("--data", default="runs/data/shakespeare", help="prepared data folder")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--text", help="evaluate this file instead (raw bytes for a byte-level model)")
    p.add_argument("--wikitext-words", action="store_true",
                   help="also report word-level perplexity (words + one <eos> per line) of --text")
    p.add_argument("--window", type=int, default=4096, help="tokens per call (default 4096)")
    p.add_argument("--reset-every", type=int, default=0, help="reset the state every N tokens (default: never)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    _config_command(sub, "generate", "sample from a checkpoint, streaming", GenerateConfig, cmd_generate)
    _config_command(sub, "passkey", "find a key stated once in a long haystack of prose", PasskeyConfig, cmd_passkey)
    p = _config_command(sub, "ingest", "stream files through a model into a saved context (resumable)",
                        IngestConfig, cmd_ingest)
    p.add_argument("files", nargs="+", help="files to read, in order")

    bench = sub.add_parser("bench", help="benchmarks (GPU for speed)").add_subparsers(dest="bench", required=True)
    _config_command(bench, "speed", "HorizonLM vs the transformer baseline: train, prefill, decode, search",
                    SpeedConfig, cmd_bench_speed)
    _config_command(bench, "memory", "memory stores: recall, latency, bytes per entry, build time",
                    MemoryBenchConfig, cmd_bench_memory)
    _config_command(bench, "quality", "quality at equal training time: HorizonLM, the transformer, ablations",
                    QualityConfig, cmd_bench_quality)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HorizonError as err:
        print(f"horizon {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"horizon {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
