"""``horizon bench merge``: one results file from the files of several calls.

A device call holds a few minutes, so ``bench quality`` trains one model per call and
``horizon passkey`` asks one checkpoint per call; each call writes its own file. Their
``models`` entries (and a quality file's ``sweeps``) already carry what made them (environment,
settings or config), so merging is a union by entry name. Two calls started from the same
results file both carry its entries: an entry found in several inputs is kept once when it is the
same in each, and refused when it differs, as are files of two protocols, rather than one
measurement silently replacing another. The merged file names its inputs and keeps each one's
top-level environment and config under ``merged_from``; other top-level records (a quality file's
``renamed_entries``) are kept when the inputs that have them agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from horizonlm.errors import HorizonError
from horizonlm.fileio import atomic_write_json, refuse_existing

KINDS = ("quality", "passkey")
PER_CALL = ("environment", "config", "data")
"""Top-level records of one call, kept per input under ``merged_from``."""
ENTRIES = ("models", "sweeps")
"""Sections merged entry by entry."""
DERIVED = {"summary", "protocol", "merged_from"}
"""Top-level records checked or remade by the merge itself."""


@dataclass
class MergeConfig:
    """Settings of ``horizon bench merge``."""

    inputs: str = ""
    """Results files to merge, comma-separated (each written by one call of the same command)."""
    out: str = ""
    """The merged file (its PNG is drawn beside it)."""
    kind: str = "quality"
    """Which command wrote the inputs: ``quality`` (``horizon bench quality``) or ``passkey``."""
    overwrite: bool = False
    """Replace ``out`` if it exists (never one of the inputs)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.out:
            raise ValueError("out must name the merged file")
        if len(self.paths()) < 2:
            raise ValueError(f"inputs must name at least two results files, got {self.inputs!r}")

    def paths(self) -> list[Path]:
        return [Path(p) for p in self.inputs.split(",") if p]


def merge_results(files: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """The union of the files' ``models`` (and ``sweeps``), each entry as it was written."""
    protocols = {json.dumps(f.get("protocol")) for f in files}
    if len(protocols) > 1:
        raise HorizonError(f"the inputs hold results of different protocols ({', '.join(sorted(protocols))}): "
                           "they are not one comparison")
    merged: dict[str, Any] = {"models": {}, "merged_from": []}
    if files[0].get("protocol") is not None:
        merged["protocol"] = files[0]["protocol"]
    for name, results in zip(names, files):
        for section in ENTRIES:
            for entry, value in results.get(section, {}).items():
                target = merged.setdefault(section, {})
                if entry in target and target[entry] != value:
                    raise HorizonError(f"{section} entry {entry!r} differs between inputs (again in {name})")
                target[entry] = value
        merged["merged_from"].append({"file": name, **{k: results[k] for k in PER_CALL if k in results}})
    for key in sorted({k for f in files for k in f} - set(ENTRIES) - set(PER_CALL) - DERIVED):
        records = [f[key] for f in files if key in f]
        if any(r != records[0] for r in records):
            raise HorizonError(f"the inputs' top-level {key!r} records differ: merge them by hand")
        merged[key] = records[0]
    return merged


def run_merge(cfg: MergeConfig) -> dict[str, Any]:
    out = Path(cfg.out)
    paths = cfg.paths()
    if out.resolve() in {p.resolve() for p in paths}:
        raise HorizonError(f"{out} is one of the inputs: give the merged file another name")
    refuse_existing(out, cfg.overwrite)
    files = []
    for path in paths:
        try:
            files.append(json.loads(path.read_text()))
        except FileNotFoundError as err:
            raise HorizonError(f"no results file at {path}") from err
        except json.JSONDecodeError as err:
            raise HorizonError(f"{path} is not a JSON results file ({err})") from err
        if not isinstance(files[-1], dict) or not isinstance(files[-1].get("models"), dict):
            raise HorizonError(f"{path} has no 'models' entries: not a results file of horizon {cfg.kind}")
    merged = merge_results(files, [str(p) for p in paths])
    if cfg.kind == "quality":
        from horizonlm.bench.quality import plot_quality
        from horizonlm.bench.quality_summary import format_quality_table, summarize_quality

        merged["summary"] = summarize_quality(merged)
        atomic_write_json(out, merged)
        plot_quality(merged, out.with_suffix(".png"))
        print(format_quality_table(merged["summary"]))
    else:
        from horizonlm.passkey import plot_passkey

        atomic_write_json(out, merged)
        plot_passkey(merged, out.with_suffix(".png"))
    return merged
