"""The device's command lists (``bench/configs/*.cmds``, run by ``bench/scripts/on_device.sh``)
name flags and models this checkout has: a misspelt line costs a device call of a session's 30
minutes, so every line is parsed and its settings built here, on the CPU, without running it."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from horizonlm.bench.quality import ABLATIONS
from horizonlm.cli import build_config, build_parser

LISTS = sorted((Path(__file__).resolve().parents[2] / "bench" / "configs").glob("*.cmds"))


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_there_are_lists_to_check() -> None:
    assert len(LISTS) > 10


@pytest.mark.parametrize("path", LISTS, ids=lambda p: p.name)
def test_every_line_of_a_device_list_parses_into_valid_settings(path: Path) -> None:
    parser = build_parser()
    for line in _lines(path):
        args, extras = parser.parse_known_args(shlex.split(line))
        assert not extras, f"{path.name}: unknown flags {extras} in {line!r}"
        cfg = build_config(_settings_class(args), args)  # each config validates itself in __post_init__
        if args.command == "bench" and args.bench == "quality":
            unknown = [m for m in cfg.models.split(",") if m not in ABLATIONS]
            assert not unknown, f"{path.name}: no bench quality model {unknown} in {line!r}"


def _settings_class(args) -> type:
    """The config dataclass a command builds from its flags (``_run_bench`` and the ``cmd_*``)."""
    from horizonlm.bench.headroom import HeadroomConfig
    from horizonlm.bench.memory import MemoryBenchConfig
    from horizonlm.bench.merge import MergeConfig
    from horizonlm.bench.quality import QualityConfig
    from horizonlm.bench.recall import RecallConfig
    from horizonlm.bench.speed import SpeedConfig
    from horizonlm.bench.ssm import SSMBenchConfig
    from horizonlm.evaluate import EvalConfig
    from horizonlm.passkey import PasskeyConfig
    from horizonlm.train import TrainConfig

    bench = {"speed": SpeedConfig, "memory": MemoryBenchConfig, "quality": QualityConfig, "recall": RecallConfig,
             "ssm": SSMBenchConfig, "merge": MergeConfig, "headroom": HeadroomConfig}
    other = {"train": TrainConfig, "passkey": PasskeyConfig, "eval": EvalConfig}
    return bench[args.bench] if args.command == "bench" else other[args.command]
