"""``horizon passkey``: find a fact stated once, far back in real prose.

A random 5-digit key is stated once ("The pass key is 48213. Remember it. 48213 is the pass
key.") at a given depth of a haystack of real text; the prompt ends with a question; the model
decodes greedily and scores when all five digits match. With ``keys > 1``, several labelled keys
are hidden and the question names one. Prompts are byte-level and fed in windows with the
state carried, so a HorizonLM reads a million-token prompt at constant memory.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from horizonlm.bench.common import parse_ints, save_figure
from horizonlm.bench.recall_probe import MemoryProbe
from horizonlm.checkpoint import run_folder
from horizonlm.data.needles import DOORS, needle, question
from horizonlm.errors import HorizonError
from horizonlm.fileio import atomic_write_json, existing_file


@dataclass
class PasskeyConfig:
    """Settings of ``horizon passkey``."""

    checkpoint: str = "runs/passkey"
    """Checkpoint folder, or a run folder whose checkpoints/latest names one."""
    haystack: str = ""
    """Text file for the haystack (default: the novels test split from ``source``)."""
    source: str = "../shared/data/novels"
    """Folder of the novels corpus (used when ``haystack`` is empty)."""
    lengths: str = "1024,4096,16384,65536,262144,1048576"
    """Prompt lengths in tokens (bytes)."""
    depths: str = "0,25,50,75,100"
    """Depths of the (asked) key, percent of the haystack."""
    trials: int = 10
    """Trials per cell, each with its own key and haystack offset."""
    keys: int = 1
    """Keys hidden per prompt; the question names one."""
    seed: int = 0
    """Seed of keys, offsets and the other keys' depths."""
    window: int = 65536
    """Prompt tokens fed per call."""
    batch: int = 1
    """Trials of a cell fed side by side (they share the length); more fill a GPU better."""
    read_topk: int = 0
    """Entries each memory read takes while answering (0: as the model was trained); 1 reads only
    the best match. A HorizonLM with memory only."""
    max_length: int = 0
    """Skip cells longer than this (0: none); reported as not run."""
    label: str = ""
    """Name of the model in the results (default: the checkpoint's kind)."""
    out: str = ""
    """Results file (default: passkey.json in the checkpoint's run folder). Entries of other
    models in it are kept; this model's earlier entry is replaced only with ``overwrite``."""
    overwrite: bool = False
    """Replace this model's earlier entry (same label and number of keys) in the results file."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    progress: bool = True
    """Show a progress bar over the trials."""

    def __post_init__(self) -> None:
        if not 1 <= self.keys <= len(DOORS):
            raise ValueError(f"keys must be in [1, {len(DOORS)}], got {self.keys}")
        for name in ("trials", "window", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_length", "seed", "read_topk"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be one of auto, cpu, cuda, got {self.device!r}")
        for name in ("lengths", "depths"):
            try:
                values = parse_ints(getattr(self, name))
            except ValueError as err:
                raise ValueError(f"{name} must be comma-separated whole numbers, got {getattr(self, name)!r}") from err
            if not values:
                raise ValueError(f"lengths and depths need at least one value each, got {self.lengths!r}, "
                                 f"{self.depths!r}")
        if any(n < 1 for n in parse_ints(self.lengths)):
            raise ValueError(f"lengths must be >= 1 token each, got {self.lengths}")
        if any(not 0 <= d <= 100 for d in parse_ints(self.depths)):
            raise ValueError(f"depths must lie in [0, 100], got {self.depths}")


def build_prompt(haystack: bytes, length: int, depth: float, n_keys: int, rng: random.Random) -> tuple[bytes, int]:
    """A prompt of exactly ``length`` bytes and the key it asks for.

    The haystack slice starts at a random offset (wrapping around); the asked key sits at
    ``depth`` percent of the haystack (snapped to a space), other keys at random depths.
    """
    doors = rng.sample(DOORS, n_keys) if n_keys > 1 else [None]
    keys = [rng.randint(10000, 99999) for _ in doors]
    asked = 0
    needles = [needle(k, d).encode() for k, d in zip(keys, doors)]
    tail = question(doors[asked]).encode()
    filler = length - sum(map(len, needles)) - len(tail)
    if filler < 0:
        raise HorizonError(f"length {length} is too short for {n_keys} key(s) and the question")
    start = rng.randrange(len(haystack))
    body = (haystack[start:] + b" " + haystack) * (1 + filler // max(1, len(haystack)))
    body = body[:filler]
    depths = [depth] + [rng.uniform(0, 100) for _ in needles[1:]]
    cuts = []
    for d in depths:
        at = int(len(body) * d / 100)
        space = body.rfind(b" ", 0, at) if 0 < at < len(body) else at
        cuts.append(space if space > 0 else at)
    order = sorted(range(len(needles)), key=lambda i: cuts[i])
    parts, prev = [], 0
    for i in order:
        parts += [body[prev : cuts[i]], needles[i]]
        prev = cuts[i]
    prompt = b"".join(parts) + body[prev:] + tail
    assert len(prompt) == length
    return prompt, keys[asked]


@torch.no_grad()
def answer(model: nn.Module, prompts: list[bytes], window: int, device: torch.device,
           new_tokens: int = 8) -> list[str]:
    """Feed prompts of one length side by side in windows with the state carried, then decode
    each greedily."""
    state, logits = None, None
    data = np.stack([np.frombuffer(p, dtype=np.uint8) for p in prompts])  # (B, T)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        for start in range(0, data.shape[1], window):
            x = torch.from_numpy(data[:, start : start + window].astype(np.int64)).to(device)  # (B, T)
            logits, state = model(x, state)
        out = []
        for _ in range(new_tokens):
            token = logits[:, -1].float().argmax(-1, keepdim=True)  # (B, 1)
            out.append(token)
            logits, state = model(token, state)
    replies = torch.cat(out, dim=1).tolist()  # B lists of new_tokens ints
    return [bytes(reply).decode("utf-8", errors="replace") for reply in replies]


def digit_positions(prompt: bytes, key: int) -> list[int]:
    """Where the asked key's five digits stand in the fact ("... is 48213."), its first statement."""
    start = prompt.find(f" {key}.".encode()) + 1
    if start == 0:
        raise HorizonError(f"key {key} is not stated in the prompt")
    return list(range(start, start + 5))


def answer_with_hits(model: nn.Module, prompts: list[bytes], keys: list[int], window: int,
                     device: torch.device) -> tuple[list[str], Tensor | None]:
    """:func:`answer`, and for a model with a memory, per prompt and answer digit (B, 5): whether
    the memory's top-K read, at the token that predicts the digit, held the entry written at that
    digit in the fact (token and pair mode) or its chunk (chunk mode). Read free-running: after a
    wrong digit the model asks about its own reply."""
    memory = getattr(model, "memory", None)
    if memory is None:
        return answer(model, prompts, window, device), None
    length = len(prompts[0])
    query_pos = torch.arange(length, length + 5, device=device).expand(len(prompts), 5)  # (B, 5): " ", 4 digits
    answer_pos = torch.tensor([digit_positions(p, k) for p, k in zip(prompts, keys)], device=device)  # (B, 5)
    with MemoryProbe(memory, query_pos) as probe:
        replies = answer(model, prompts, window, device)
    found = probe.outcome(answer_pos)
    return replies, (found["hit_entry"] if memory.entries_per_chunk > 1 else found["hit"])  # (B, 5)


def set_read_topk(model: nn.Module, top_k: int) -> None:
    """Make every memory read take ``top_k`` entries (0: leave it as trained)."""
    if not top_k:
        return
    memory = getattr(model, "memory", None)
    if memory is None:
        raise HorizonError(f"read_topk={top_k} needs a HorizonLM with its memory; this model has none")
    if top_k > memory.capacity:
        raise HorizonError(f"read_topk={top_k} exceeds the model's memory_capacity={memory.capacity}")
    memory.top_k = top_k


def score(reply: str, key: int) -> bool:
    """Exact match of all five digits: the first 5-digit number in the reply."""
    found = re.search(r"\d{5}", reply)
    return found is not None and int(found.group()) == key


def digits_right(reply: str, key: int) -> int:
    """Partial credit, for diagnosis only: digits of the key matched at their place in the
    reply's first five characters after leading spaces (exact match is what scores)."""
    return sum(a == b for a, b in zip(reply.lstrip()[:5], str(key)))


def run_passkey(model: nn.Module, haystack: bytes, cfg: PasskeyConfig, device: torch.device,
                label: str, on_cell=None) -> dict[str, Any]:
    """Every (length, depth) cell; returns the results entry for ``label`` (``complete`` once
    every cell ran). ``on_cell(entry)`` is called after each cell (to save partial results)."""
    model.eval()
    cells: list[dict[str, Any]] = []
    entry = {"keys": cfg.keys, "cells": cells, "config": asdict(cfg), "complete": False}
    grid = [(n, d) for n in parse_ints(cfg.lengths) for d in parse_ints(cfg.depths)]
    runs = sum(cfg.trials for n, _ in grid if not (cfg.max_length and n > cfg.max_length))
    with tqdm(total=runs, desc=f"passkey {label}", unit="trial", disable=not cfg.progress, leave=False) as bar:
        for length, depth in grid:
            if cfg.max_length and length > cfg.max_length:
                cells.append({"length": length, "depth": depth, "status": "not run",
                              "reason": f"longer than max_length={cfg.max_length}"})
            else:
                cells.append(_run_cell(model, haystack, cfg, device, length, depth, bar))
            if on_cell is not None:
                on_cell(entry)
    entry["complete"] = True
    return entry


def _run_cell(model: nn.Module, haystack: bytes, cfg: PasskeyConfig, device: torch.device, length: int,
              depth: int, bar: tqdm) -> dict[str, Any]:
    """``cfg.trials`` prompts of one length with the asked key at one depth, scored."""
    rng = random.Random(f"{cfg.seed}-{length}-{depth}-{cfg.keys}")
    asked = [build_prompt(haystack, length, depth, cfg.keys, rng) for _ in range(cfg.trials)]
    keys = [key for _, key in asked]
    replies, hits, t0 = [], [], time.perf_counter()
    for first in range(0, len(asked), cfg.batch):
        group = asked[first : first + cfg.batch]
        try:
            got, hit = answer_with_hits(model, [prompt for prompt, _ in group], [key for _, key in group],
                                        cfg.window, device)
        except torch.cuda.OutOfMemoryError:
            return {"length": length, "depth": depth, "status": "OOM"}
        replies += got
        if hit is not None:
            hits.append(hit.cpu())
        bar.update(len(group))
    seconds = time.perf_counter() - t0
    correct = sum(score(reply, key) for reply, key in zip(replies, keys))
    digits = sum(digits_right(reply, key) for reply, key in zip(replies, keys))
    bar.set_postfix(last=f"{length // 1024}K at {depth}%: {correct}/{cfg.trials}")
    cell = {"length": length, "depth": depth, "status": "ok", "trials": cfg.trials, "accuracy": correct / cfg.trials,
            "digit_accuracy": digits / (5 * cfg.trials), "seconds_per_trial": seconds / cfg.trials,
            "examples": [[key, reply] for key, reply in zip(keys, replies)]}
    if hits:
        cell["memory_hit_by_digit"] = torch.cat(hits).float().mean(0).tolist()  # 5 rates, the first digit first
    return cell


def format_table(name: str, entry: dict[str, Any]) -> str:
    """The accuracy of every cell as a small text table: a row per depth, a column per length."""
    lengths = sorted({c["length"] for c in entry["cells"]})
    depths = sorted({c["depth"] for c in entry["cells"]})
    shown = {(c["length"], c["depth"]): f"{c['accuracy']:.0%}" if c["status"] == "ok" else c["status"]
             for c in entry["cells"]}
    heads = ["depth"] + [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths]
    rows = [[f"{d}%"] + [shown.get((n, d), "-") for n in lengths] for d in depths]
    widths = [max(len(row[i]) for row in [heads, *rows]) for i in range(len(heads))]
    lines = [f"passkey accuracy, {name} (rows: depth of the key; columns: context length in tokens)"]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [heads, *rows]]
    return "\n".join(lines)


def load_haystack(cfg: PasskeyConfig) -> bytes:
    if cfg.haystack:
        data = existing_file(cfg.haystack, "--haystack").read_bytes()
    else:
        from horizonlm.data.sources import novels

        data = novels(cfg.source).splits["test"]
    data = b" ".join(data.split())  # one line of prose: the needle is the only structure
    if len(data) < 1000:
        raise HorizonError("the haystack needs at least 1,000 bytes of text")
    return data


def entry_name(label: str, keys: int) -> str:
    """The name of a model's entry in the results file: its label and number of keys."""
    return f"{label} ({keys} key{'s' if keys > 1 else ''})"


def results_path(cfg: PasskeyConfig, checkpoint_folder: Path) -> Path:
    """``cfg.out``, or passkey.json in the checkpoint's run folder."""
    return Path(cfg.out) if cfg.out else run_folder(checkpoint_folder) / "passkey.json"


def read_results(path: Path, what: str = "--out") -> dict[str, Any]:
    """The results file (empty results when there is none); a file that is not one is refused,
    never replaced. ``what`` names the flag that gave the path, for the message."""
    if not path.exists():
        return {"models": {}}
    existing_file(path, what)
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HorizonError(f"{what} {path} is not a passkey results file (not valid JSON: {err}); "
                           f"give another {what}") from err
    if not isinstance(results, dict) or not isinstance(results.get("models"), dict):
        raise HorizonError(f"{what} {path} is not a passkey results file (no 'models' mapping); give another {what}")
    return results


def check_new_entry(path: Path, name: str, overwrite: bool) -> None:
    """Refuse, before any work, to replace an entry of the results file without ``overwrite``."""
    old = read_results(path)["models"].get(name)
    if old is not None and not overwrite:
        state = "complete" if old.get("complete", True) else "partial, from an interrupted run"
        raise HorizonError(f"{path} already holds results for {name!r} ({state}); pass --overwrite to replace "
                           "them, or --label NAME to add this run beside them")


def save_results(path: str | Path, label: str, entry: dict[str, Any], environment: dict[str, Any]) -> dict[str, Any]:
    """Add or replace ``label``'s entry in the results file (other labels are kept); returns
    the whole results. Called after every cell, so it writes JSON only (plot once at the end)."""
    path = Path(path)
    results = read_results(path)
    results["models"][entry_name(label, entry["keys"])] = {**entry, "environment": environment}
    atomic_write_json(path, results)
    return results


def plot_passkey(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    columns = min(len(models), 4)
    rows = -(-len(models) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.axis("off")
    for ax, (name, entry) in zip(axes.flat, models.items()):
        lengths = sorted({c["length"] for c in entry["cells"]})
        depths = sorted({c["depth"] for c in entry["cells"]})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for c in entry["cells"]:
            if c["status"] == "ok":
                grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["accuracy"]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("depth")
        ax.set_title(name, fontsize=9)
        hits = {(c["length"], c["depth"]): c["memory_hit_by_digit"] for c in entry["cells"] if "memory_hit_by_digit" in c}
        for i in range(len(depths)):
            for j in range(len(lengths)):
                shown = "-" if np.isnan(grid[i, j]) else f"{grid[i, j]:.0%}"
                if (lengths[j], depths[i]) in hits:  # the memory read the fact's digit: first digit, all five
                    rates = hits[(lengths[j], depths[i])]
                    shown += f"\nhit {rates[0]:.0%}/{sum(rates) / len(rates):.0%}"
                ax.text(j, i, shown, ha="center", va="center", fontsize=6 if hits else 7)
        if hits:
            ax.set_title(f"{name}\n(hit: memory read the fact's entry, first digit / all five)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
