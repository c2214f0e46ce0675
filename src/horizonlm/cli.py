"""The ``horizon`` command. Flags are generated from the config dataclasses (help text from the
field docstrings); ``--config FILE.yaml`` supplies defaults that explicit flags override. Errors
name the flag and what it expects; no command replaces a run, prepared data or a results entry
without ``--overwrite`` (or ``--resume``)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
import math
import re
import sys
import textwrap
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from horizonlm.devices import resolve_device
from horizonlm.errors import HorizonError, Stopped
from horizonlm.fileio import existing_file


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its docstring), base classes' first,
    so a subclass that declares a field again documents it anew."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if "__dataclass_fields__" not in vars(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                    docs[node.target.id] = " ".join(after.value.value.split())
    return docs


class Parser(argparse.ArgumentParser):
    """An argument parser that takes no abbreviated flag: ``--max-minute`` is a typo to report,
    not ``--max-minutes``. Subcommand parsers are of this class too (argparse makes them so)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def unrecognized(self, extras: Sequence[str]) -> str:
        """The error for arguments this parser does not take, each flag with its closest real one."""
        flags = [s for action in self._actions for s in action.option_strings]
        words = []
        for arg in extras:
            close = difflib.get_close_matches(arg.split("=", 1)[0], flags, n=1) if arg.startswith("-") else []
            words.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
        return f"unrecognized arguments: {' '.join(words)}"


def flag(name: str) -> str:
    """The command-line flag of a config field."""
    return "--" + name.replace("_", "-")


def _parse_mapping(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"d_model\": 64}}', got {text!r} "
                                         f"({err.msg} at character {err.pos})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"d_model\": 64}}', got {text!r}")
    return value


def _is_bool(kind: Any) -> bool:
    """A yes/no setting: ``bool``, or ``bool | None`` (None: decided at run time, e.g. on a terminal)."""
    return kind is bool or set(typing.get_args(kind)) == {bool, type(None)}


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "" if default is None or default in ("", {}) else f" (default: {default!r})"
        help_text = docs.get(f.name, "") + shown
        if _is_bool(kind):
            parser.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif kind in (int, float, str):
            parser.add_argument(flag(f.name), dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_text,
                                metavar=f.name.upper())
        elif typing.get_origin(kind) is dict:
            parser.add_argument(flag(f.name), dest=f.name, type=_parse_mapping, default=argparse.SUPPRESS,
                                help=help_text + " as JSON", metavar="JSON")
        else:
            raise TypeError(f"no flag type for {cls.__name__}.{f.name}: {kind}")


@dataclasses.dataclass
class Settings:
    """Settings for one config class, gathered from a YAML file and the flags, with where each came from."""

    cls: type
    """The config dataclass the settings are for."""
    values: dict[str, Any]
    """Field name -> value, the flags over the YAML file (defaults left out)."""
    from_file: set[str]
    """Names whose value came from the YAML file (and no flag)."""
    file: str | None
    """The ``--config`` YAML file, if one was given."""


def gather(cls: type, args: argparse.Namespace) -> Settings:
    """The YAML file's settings (checked: known names, right types), then the explicit flags."""
    values: dict[str, Any] = {}
    path = getattr(args, "config", None)
    if path:
        values.update(_read_yaml(cls, existing_file(path, "--config")))
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return Settings(cls=cls, values={**values, **given}, from_file=set(values) - set(given), file=path)


def _read_yaml(cls: type, path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise HorizonError(f"--config {path} is not valid YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise HorizonError(f"--config {path} must hold a mapping of settings (name: value lines)")
    hints = typing.get_type_hints(cls)
    for name in loaded:
        if name not in hints:
            close = difflib.get_close_matches(str(name), hints, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise HorizonError(f"--config {path}: {name!r} is not a setting of this command{hint}")
    return {name: _typed(hints[name], name, value, path) for name, value in loaded.items()}


def _typed(kind: Any, name: str, value: Any, path: Path) -> Any:
    """A YAML value as the field's type; YAML 1.1 reads ``6e-3`` as a string, so numbers in
    strings are accepted for float fields."""
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if _is_bool(kind):
        kind = bool
    expected = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
    ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) if kind in expected else (
        isinstance(value, dict))
    if not ok:
        raise HorizonError(f"--config {path}: {name} must be {expected.get(kind, 'a mapping')}, got {value!r}")
    return value


def make(settings: Settings) -> Any:
    """The config object; a refused value is reported by its flag (or its line in the YAML file)."""
    for name, value in settings.values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise HorizonError(f"{flag(name)} must be a finite number, got {value}")
    try:
        return settings.cls(**settings.values)
    except ValueError as err:
        raise HorizonError(_in_flag_words(str(err), settings)) from err


def _in_flag_words(message: str, settings: Settings) -> str:
    """A config's error message as the command line says it: its field names become flags where
    they are surely names (the first word, a name with an underscore, a name in backticks), and a
    value set in the YAML file says so."""
    names = {f.name for f in dataclasses.fields(settings.cls)}

    def to_flag(match: re.Match) -> str:
        quoted, word = match.group(1) is not None, match.group(2)
        if word in names and (quoted or match.start() == 0 or "_" in word):
            return flag(word)
        return match.group(0)

    first = re.match(r"[a-z][a-z0-9_]*", message)
    where = f" (set in {settings.file})" if first and first.group(0) in settings.from_file else ""
    return re.sub(r"(`)?\b([a-z][a-z0-9_]*)\b(?(1)`)", to_flag, message) + where


def build_config(cls: type, args: argparse.Namespace) -> Any:
    """Dataclass defaults, then the YAML file, then explicit flags."""
    return make(gather(cls, args))


def _warner(command: str) -> Callable[[str], None]:
    return lambda message: print(f"horizon {command}: warning: {message}", file=sys.stderr)


def _train_config(args: argparse.Namespace) -> Any:
    """The training settings; with ``--resume``, the run's saved ones under the given ones."""
    from horizonlm.train import TrainConfig, resumed_settings

    settings = gather(TrainConfig, args)
    if settings.values.get("resume") and not settings.values.get("overwrite"):
        settings.values = resumed_settings(settings.values)
    return make(settings)


def cmd_prepare(args: argparse.Namespace) -> int:
    from horizonlm.data.prepare import PrepareConfig, prepare

    cfg = build_config(PrepareConfig, args)
    out = cfg.out or f"runs/data/{args.name}"
    meta = prepare(args.name, out, source=cfg.source or None, tokenizer=cfg.tokenizer or None, bpe_vocab=cfg.bpe_vocab,
                   overwrite=cfg.overwrite, progress=cfg.progress)
    sizes = ", ".join(f"{k} {v['tokens']:,} tokens" for k, v in meta["splits"].items())
    print(f"prepared {args.name} in {out}: {meta['tokenizer']['kind']} tokenizer, vocabulary {meta['vocab_size']}, {sizes}")
    return 0


def train_report(summary: dict[str, Any]) -> str:
    """What a finished ``horizon train`` says: the step and training time over every invocation
    of the run, the last validation, and the latest and best checkpoints (the latest is what
    ``--checkpoint RUN`` loads; the best needs ``--checkpoint RUN/checkpoints/best``)."""
    seconds = f"{summary['train_seconds']:.0f} s of training"
    if summary["start_step"] > 0:
        seconds += f", {summary['session_train_seconds']:.0f} s of it in this invocation"
    lines = [f"trained to step {summary['step']} in {seconds}"]
    if summary["valid"]:
        last = summary["valid"][-1]
        partial = "" if last.get("valid_complete", True) else " (cut short)"
        lines.append(f"last validation (step {last['step']}): {last['valid_bits_per_byte']:.4f} bits/byte over "
                     f"{last['valid_tokens']:,} tokens{partial}")
    lines.append(f"latest checkpoint: {summary['latest']} (what --checkpoint {Path(summary['checkpoint']).parent} "
                 "loads)")
    best = summary.get("best")
    if best is not None:
        lines.append(f"best checkpoint: {best['checkpoint']} (step {best['step']}, valid "
                     f"{best['valid_bits_per_byte']:.4f} bits/byte; --checkpoint {summary['checkpoint']}/best)")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from horizonlm.train import train

    summary = train(_train_config(args))
    if summary.get("parameters") is not None:
        print(train_report(summary))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from horizonlm.evaluate import EvalConfig, run_eval

    report = run_eval(build_config(EvalConfig, args), _warner("eval"))
    print(json.dumps(report, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from horizonlm.checkpoint import load_checkpoint
    from horizonlm.data.tokenizers import tokenizer_from_spec
    from horizonlm.generate import GenerateConfig, check_prompt, generate

    cfg = build_config(GenerateConfig, args)
    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(cfg.checkpoint)
    tokenizer = tokenizer_from_spec(ckpt.info["tokenizer"])
    check_prompt(cfg, tokenizer, _warner("generate"))

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    model = ckpt.model.to(device)
    state = None
    if cfg.context:
        from horizonlm.context import load_context

        state, _ = load_context(cfg.context, model, device)
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
    from horizonlm.progress import show_bars
    from horizonlm.train import train

    cfg = _train_config(args)
    bars = show_bars(cfg.progress)
    prepare("shakespeare", cfg.data, progress=bars)
    summary = train(cfg)
    ckpt = load_checkpoint(Path(cfg.out) / "checkpoints")
    device = resolve_device(cfg.device)
    meta = load_meta(cfg.data)
    test = evaluate_tokens(ckpt.model.to(device), open_split(cfg.data, "test"), cfg.eval_window, device,
                           progress=bars, desc="test")
    print("\n--- sample ---")
    gen = GenerateConfig(checkpoint=str(ckpt.path), prompt="ROMEO:\n", tokens=300, device=cfg.device)
    generate(ckpt.model, tokenizer_from_spec(meta["tokenizer"]), gen, device,
             lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    print("\n--------------")
    last = summary["valid"][-1] if summary["valid"] else {}
    valid = last.get("valid_bits_per_byte")
    cut = "" if last.get("valid_complete", True) else f" (first {last['valid_tokens']:,} tokens: cut short)"
    print(f"valid split: {valid:.4f} bits/byte{cut}; test split: {test['bits_per_byte']:.4f} bits/byte over "
          f"{test['tokens']:,} bytes (trained {summary['step']} steps, {summary['tokens_seen']:,} tokens, "
          f"{summary['train_seconds']:.0f} s)")
    print(f"checkpoint: {ckpt.path} (the latest; the test split and the sample are its)")
    best = summary.get("best")
    if best is not None:
        print(f"best validation: step {best['step']}, {best['valid_bits_per_byte']:.4f} bits/byte, checkpoint "
              f"{best['checkpoint']} (--checkpoint {summary['checkpoint']}/best)")
    report = {"environment": environment(), "steps": summary["step"], "tokens_seen": summary["tokens_seen"],
              "train_seconds": summary["train_seconds"], "parameters": summary["parameters"],
              "valid_bits_per_byte": valid, "valid_tokens": last.get("valid_tokens"),
              "test_bits_per_byte": test["bits_per_byte"],
              "checkpoint": str(ckpt.path), "best": best, "train_config": dataclasses.asdict(cfg)}
    atomic_write_json(Path(cfg.out) / "demo.json", report)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from horizonlm.fileio import not_text
    from horizonlm.ingest import IngestConfig, ingest

    cfg = build_config(IngestConfig, args)
    warn = _warner("ingest")
    for name in args.files:
        problem = not_text(existing_file(name, "ingest"))
        if problem:
            warn(f"{name} does not look like text ({problem}); reading its raw bytes")
    print(json.dumps(ingest(args.files, cfg), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from horizonlm.integrations.export import ExportConfig, export_folder

    cfg = build_config(ExportConfig, args)
    out = export_folder(cfg.checkpoint, cfg.out, overwrite=cfg.overwrite)
    print(f"exported {cfg.checkpoint} to {out}: config.json, model.safetensors, tokenizer.json "
          "(AutoModelForCausalLM.from_pretrained after `import horizonlm.integrations.hf`) and checkpoint.json "
          "(every --checkpoint of horizon takes the folder)")
    return 0


CPU_PASSKEY_TOKENS = 65_536
"""Passkey prompts longer than this take minutes each on a CPU: a run asking them is warned."""


def _warn_long_passkey_on_cpu(cfg: Any, device: Any, warn: Callable[[str], None]) -> None:
    """The recipe's default lengths reach 1M tokens, sized for a GPU; say so before a CPU starts on them."""
    from horizonlm.passkey import parse_ints

    if device.type != "cpu":
        return
    asked = [n for n in parse_ints(cfg.lengths) if not (cfg.max_length and n > cfg.max_length)]
    long = [n for n in asked if n > CPU_PASSKEY_TOKENS]
    if long:
        cells = len(long) * len(parse_ints(cfg.depths))
        warn(f"running on the CPU with prompts up to {max(long):,} tokens ({cells} cells of {cfg.trials} trials "
             f"longer than {CPU_PASSKEY_TOKENS:,}): each such prompt takes minutes here, the run hours; these "
             f"lengths are sized for a GPU. --max-length {CPU_PASSKEY_TOKENS} skips them")


def cmd_passkey(args: argparse.Namespace) -> int:
    from horizonlm.bench.common import environment
    from horizonlm.checkpoint import load_checkpoint
    from horizonlm.data.tokenizers import require_byte_level
    from horizonlm.passkey import (
        PasskeyConfig,
        check_new_entry,
        entry_name,
        format_table,
        load_haystack,
        plot_passkey,
        results_path,
        run_passkey,
        prepare_model,
        save_results,
    )

    cfg = build_config(PasskeyConfig, args)
    device = resolve_device(cfg.device)
    _warn_long_passkey_on_cpu(cfg, device, _warner("passkey"))
    ckpt = load_checkpoint(cfg.checkpoint)
    require_byte_level(ckpt.info.get("tokenizer", {}), f"passkey prompts are raw bytes; checkpoint {ckpt.path}")
    prepare_model(ckpt.model, cfg)
    label = cfg.label or ckpt.info["kind"]
    out = results_path(cfg, ckpt.path)
    check_new_entry(out, entry_name(label, cfg.keys, cfg.wording), cfg.overwrite)
    # which weights answered: a run folder resolves to its latest checkpoint, whose step says how far it trained
    memory = getattr(ckpt.model, "memory", None)
    env = {**environment(), "checkpoint": {"path": str(ckpt.path), "step": ckpt.info.get("step"),
                                           "memory_read": memory.read_scalars() if memory is not None else None}}
    entry = run_passkey(ckpt.model.to(device), load_haystack(cfg), cfg, device, label,
                        on_cell=lambda partial: save_results(out, label, partial, env))
    plot_passkey(save_results(out, label, entry, env), out.with_suffix(".png"))
    print(format_table(entry_name(label, cfg.keys, cfg.wording), entry))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _run_bench(args: argparse.Namespace, cls: type, run, png: bool) -> int:
    """Build the benchmark's ``cls`` settings from the flags, run it, say what it wrote."""
    cfg = build_config(cls, args)
    run(cfg)
    print(f"wrote {cfg.out} and {Path(cfg.out).with_suffix('.png')}" if png else f"wrote {cfg.out}")
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from horizonlm.bench.speed import SpeedConfig, run_speed

    return _run_bench(args, SpeedConfig, run_speed, png=True)


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from horizonlm.bench.memory import MemoryBenchConfig, run_memory_bench

    return _run_bench(args, MemoryBenchConfig, run_memory_bench, png=False)


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from horizonlm.bench.quality import QualityConfig, run_quality

    return _run_bench(args, QualityConfig, run_quality, png=True)


def cmd_bench_recall(args: argparse.Namespace) -> int:
    from horizonlm.bench.recall import RecallConfig, run_recall

    return _run_bench(args, RecallConfig, run_recall, png=True)


def cmd_bench_ssm(args: argparse.Namespace) -> int:
    from horizonlm.bench.ssm import SSMBenchConfig, run_ssm_bench

    return _run_bench(args, SSMBenchConfig, run_ssm_bench, png=False)


def cmd_bench_headroom(args: argparse.Namespace) -> int:
    from horizonlm.bench.headroom import HeadroomConfig, run_headroom

    return _run_bench(args, HeadroomConfig, run_headroom, png=True)


def cmd_bench_merge(args: argparse.Namespace) -> int:
    from horizonlm.bench.merge import MergeConfig, run_merge

    return _run_bench(args, MergeConfig, run_merge, png=True)


def _config_command(sub, name: str, help_text: str, cls: type, func) -> argparse.ArgumentParser:
    """A subcommand whose flags are the fields of ``cls``, plus ``--config FILE.yaml``."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--config", help="YAML file of settings (flags override it)", metavar="FILE.yaml")
    add_dataclass_args(p, cls)
    p.set_defaults(func=func, parser=p)
    return p


def build_parser() -> argparse.ArgumentParser:
    from horizonlm.bench.headroom import HeadroomConfig
    from horizonlm.bench.memory import MemoryBenchConfig
    from horizonlm.bench.merge import MergeConfig
    from horizonlm.bench.quality import QualityConfig
    from horizonlm.bench.recall import RecallConfig
    from horizonlm.bench.speed import SpeedConfig
    from horizonlm.bench.ssm import SSMBenchConfig
    from horizonlm.data.prepare import CORPORA, PrepareConfig
    from horizonlm.evaluate import EvalConfig
    from horizonlm.generate import GenerateConfig
    from horizonlm.ingest import IngestConfig
    from horizonlm.passkey import PasskeyConfig
    from horizonlm.train import TrainConfig

    parser = Parser(prog="horizon", description="HorizonLM: attention-free long-context language models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _config_command(sub, "prepare", "build memory-mapped token streams for a corpus", PrepareConfig, cmd_prepare)
    p.add_argument("name", choices=CORPORA, help="the corpus: shakespeare (shipped), novels, wikitext, enwik8 or text")
    _config_command(sub, "train", "train a model on prepared data", TrainConfig, cmd_train)
    _config_command(sub, "demo", "prepare Shakespeare, train, score the test split and sample", TrainConfig, cmd_demo)
    _config_command(sub, "eval", "stream a split or a text file through a checkpoint", EvalConfig, cmd_eval)
    _config_command(sub, "generate", "sample from a checkpoint, streaming", GenerateConfig, cmd_generate)
    _config_command(sub, "passkey", "find a key stated once in a long haystack of prose", PasskeyConfig, cmd_passkey)
    p = _config_command(sub, "ingest", "stream files through a model into a saved context (resumable)",
                        IngestConfig, cmd_ingest)
    p.add_argument("files", nargs="+", help="files to read, in order")

    from horizonlm.integrations.export import ExportConfig

    _config_command(sub, "export", "write a checkpoint as a Hugging Face folder (config.json, model.safetensors, "
                    "tokenizer.json)", ExportConfig, cmd_export)

    bench = sub.add_parser("bench", help="benchmarks (GPU for speed)").add_subparsers(dest="bench", required=True)
    _config_command(bench, "speed", "HorizonLM vs the transformer baseline: train, prefill, decode, search",
                    SpeedConfig, cmd_bench_speed)
    _config_command(bench, "memory", "memory stores: recall, latency, bytes per entry, build time",
                    MemoryBenchConfig, cmd_bench_memory)
    _config_command(bench, "quality", "quality at equal training time: HorizonLM, the transformer, ablations",
                    QualityConfig, cmd_bench_quality)
    _config_command(bench, "recall", "associative recall in one window and across windows, with the memory's hit rate",
                    RecallConfig, cmd_bench_recall)
    _config_command(bench, "ssm", "the SSM sublayer alone: fast scans against float64 references, timings",
                    SSMBenchConfig, cmd_bench_ssm)
    _config_command(bench, "headroom", "what a book's far past offers as exact n-gram counts, and how much of it "
                    "checkpoints take (no training)", HeadroomConfig, cmd_bench_headroom)
    _config_command(bench, "merge", "one results file from those of several calls (quality or passkey)",
                    MergeConfig, cmd_bench_merge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # said by the subcommand's parser: its usage, and the flag meant
        command_parser = getattr(args, "parser", parser)
        command_parser.error(command_parser.unrecognized(extras))
    try:
        return args.func(args)
    except Stopped as err:
        print(f"horizon {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except HorizonError as err:
        print(f"horizon {args.command}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"horizon {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
