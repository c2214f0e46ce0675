"""``horizon passkey``: find a fact stated once, far back in real prose.

A random 5-digit key is stated once at a given depth of a haystack of real text; the prompt
ends with a question; the model decodes greedily and scores when its reply's first number is
exactly the key. With ``keys > 1``, several labelled keys are hidden and the question names one.
Two wordings: ``benchmark`` ("The pass key is 48213. Remember it. 48213 is the pass key.",
:mod:`horizonlm.data.needles`) and ``heldout`` (the held-out phrasings of
:mod:`horizonlm.data.episodes`); the training mix states neither. A third, ``train``, asks in the
phrasings the training mix states (new sentences, known phrasings): a diagnostic, never a claim.
Prompts are byte-level and fed in windows with the state carried, so a HorizonLM reads a
million-token prompt at constant memory.

Every trial records its phrasing and its cue overlap (:func:`horizonlm.data.episodes.cue_overlap`:
the bytes the question's end shares with the text before the value), and an entry tabulates
accuracy by overlap (``by_cue_overlap``): an induction key of n bytes matches the fact exactly
only from an overlap of n.

The causal check (``causal_check``) asks each prompt twice more: with the memory's read removed
(its gated add dropped at every token), and with the fact's entries (the digits' and those whose
keys name a digit; keys and values) replaced by those the same prompt writes when it states
another key (read off a second feed of that text, so the check holds wherever the memory reads).
An answer that fails without the read and follows the swapped entries came from the memory.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from horizonlm.bench.common import parse_ints, save_figure
from horizonlm.bench.recall_probe import MemoryProbe
from horizonlm.checkpoint import run_folder
from horizonlm.data.episodes import cue_overlap, make_fact
from horizonlm.data.needles import DOORS, needle, question
from horizonlm.errors import HorizonError
from horizonlm.layers.memory import reads_dropped
from horizonlm.fileio import atomic_write_json, existing_file


WORDINGS = ("benchmark", "heldout", "train")
"""How a prompt states and asks its facts (see the module docstring)."""


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
    wording: str = "benchmark"
    """``benchmark`` (the needle sentences), ``heldout`` (phrasings the training mix never states)
    or ``train`` (phrasings the training mix states, in new sentences: a diagnostic, not a claim)."""
    causal_check: bool = False
    """Ask every prompt again with the memory's read removed and with the fact's entries as
    another key's statement writes them (the induction memory; about four times the cost)."""
    memory_capacity: int = 0
    """Chunks the memory keeps while asking (0: as trained). Training keeps a few windows; a
    1M-token prompt needs 1M / chunk_size for the fact to stay visible. Weights do not depend on it."""
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
        if self.wording not in WORDINGS:
            raise ValueError(f"wording must be one of {', '.join(WORDINGS)}, got {self.wording!r}")
        for name in ("max_length", "seed", "read_topk", "memory_capacity"):
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


@dataclass(frozen=True)
class Prompt:
    """One passkey prompt."""

    text: bytes
    key: int
    """The asked key."""
    question_at: int
    """Where the question starts (the prompt's last bytes)."""
    form: str = "benchmark"
    """The asked fact's phrasing: ``benchmark``, or its core and question phrasings."""
    overlap: int = 0
    """The asked fact's cue overlap (:func:`horizonlm.data.episodes.cue_overlap`)."""


def _statements(keys: list[int], doors: list[str | None], wording: str, rng: random.Random
                ) -> tuple[list[bytes], bytes, str, int]:
    """The facts, the question asking the first key, and that fact's phrasing and cue overlap,
    in the benchmark's, the held-out or the training wording."""
    if wording == "benchmark":
        facts, asked = [needle(k, d) for k, d in zip(keys, doors)], question(doors[0])
        return [f.encode() for f in facts], asked.encode(), "benchmark", cue_overlap(facts[0], asked, str(keys[0]))
    labels = [f"the {d} door" if d else f"the {rng.choice(DOORS)} door" for d in doors]
    facts = [make_fact(rng, label, str(key), held_out=wording == "heldout") for label, key in zip(labels, keys)]
    first = facts[0]
    return ([f.statement.encode() for f in facts], first.question.encode(), f"{first.core} |{first.asked}",
            cue_overlap(first.statement, first.question, first.value))


def build_prompt(haystack: bytes, length: int, depth: float, n_keys: int, rng: random.Random,
                 wording: str = "benchmark") -> Prompt:
    """A prompt of exactly ``length`` bytes and the key it asks for.

    The haystack slice starts at a random offset (wrapping around); the asked key sits at
    ``depth`` percent of the haystack (snapped to a space), other keys at random depths.
    """
    doors = rng.sample(DOORS, n_keys) if n_keys > 1 else [None]
    keys = [rng.randint(10000, 99999) for _ in doors]
    asked = 0
    needles, tail, form, overlap = _statements(keys, doors, wording, rng)
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
    return Prompt(prompt, keys[asked], length - len(tail), form, overlap)


@torch.no_grad()
def feed(model: nn.Module, data: np.ndarray, window: int, device: torch.device, state: Any = None
         ) -> tuple[Tensor, Any]:
    """Prompts of one length (B, T) side by side in windows, the state carried: the last logits
    (B, V) and the state."""
    logits = None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, data.shape[1], window):
            x = torch.from_numpy(data[:, start : start + window].astype(np.int64)).to(device)  # (B, T)
            logits, state = model(x, state)
    return logits[:, -1].float(), state  # (B, V)


@torch.no_grad()
def decode(model: nn.Module, logits: Tensor, state: Any, device: torch.device, new_tokens: int = 8) -> list[str]:
    """Greedy continuation from the last logits (B, V) and state."""
    out = []
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for _ in range(new_tokens):
            token = logits.argmax(-1, keepdim=True)  # (B, 1)
            out.append(token)
            step, state = model(token, state)
            logits = step[:, -1].float()  # (B, V)
    replies = torch.cat(out, dim=1).tolist()  # B lists of new_tokens ints
    return [bytes(reply).decode("utf-8", errors="replace") for reply in replies]


def answer(model: nn.Module, prompts: list[bytes], window: int, device: torch.device,
           new_tokens: int = 8) -> list[str]:
    """Feed prompts of one length side by side in windows with the state carried, then decode
    each greedily."""
    data = np.stack([np.frombuffer(p, dtype=np.uint8) for p in prompts])  # (B, T)
    logits, state = feed(model, data, window, device)
    return decode(model, logits, state, device, new_tokens)


def swap_fact_entries(model: nn.Module, state: Any, prompts: list[Prompt], swap_keys: list[int],
                      window: int, device: torch.device) -> tuple[Any, list[bool]]:
    """The state with each prompt's fact entries (keys and values) as the same prompt writes them
    with ``swap_keys``' digits in the asked key's place, read off a second feed of that text (so
    it holds wherever the memory reads), and for each prompt whether its fact's entries were
    still in the memory. The fact's entries are those a digit wrote or whose key's span covers a
    digit: positions ``first digit .. last digit + key span`` (a digit's key names the digits
    before it, so values alone cannot carry the other key's chain of lookups)."""
    mem = state.memory
    first = mem.pos - mem.values.shape[1]  # stream position of the oldest entry kept
    swapped = np.stack([np.frombuffer(swap_key_text(p, k)[:p.question_at], dtype=np.uint8)
                        for p, k in zip(prompts, swap_keys)])  # (B, T)
    _, other = feed(model, swapped, window, device)
    keys, values = mem.keys.clone(), mem.values.clone()  # (B, M, Dk), (B, M, Dv)
    usable = []
    for b, prompt in enumerate(prompts):
        rows = [p - first for p in fact_entry_positions(prompt, model.memory.key_span)]
        usable.append(rows[0] >= 0)
        if usable[-1]:
            keys[b, rows] = other.memory.keys[b, rows].to(keys.dtype)
            values[b, rows] = other.memory.values[b, rows].to(values.dtype)
    return replace(state, memory=replace(mem, keys=keys, values=values)), usable


def fact_entry_positions(prompt: Prompt, key_span: int) -> list[int]:
    """Stream positions of the entries the asked key's first statement writes or keys: its five
    digits and the ``key_span`` entries after them (their keys name digits), before the question."""
    at = digit_positions(prompt.text, prompt.key)
    return list(range(at[0], min(at[-1] + key_span + 1, prompt.question_at)))


def swap_key_text(prompt: Prompt, swap_key: int) -> bytes:
    """The prompt with the asked key's first statement spelling ``swap_key`` instead."""
    at = digit_positions(prompt.text, prompt.key)
    return prompt.text[:at[0]] + str(swap_key).encode() + prompt.text[at[-1] + 1:]


@torch.no_grad()
def swapped_answer(model: nn.Module, prompts: list[Prompt], swap_keys: list[int], window: int,
                   device: torch.device) -> list[str | None]:
    """Answers after the asked fact's entries were replaced by those ``swap_keys``' statement
    writes (:func:`swap_fact_entries`), just before the question is read. None where the fact's
    entries were evicted."""
    question_at = prompts[0].question_at
    if any(p.question_at != question_at for p in prompts):  # questions of other lengths: one by one
        return [swapped_answer(model, [p], [k], window, device)[0] for p, k in zip(prompts, swap_keys)]
    data = np.stack([np.frombuffer(p.text, dtype=np.uint8) for p in prompts])  # (B, T)
    _, state = feed(model, data[:, :question_at], window, device)
    state, usable = swap_fact_entries(model, state, prompts, swap_keys, window, device)
    logits, state = feed(model, data[:, question_at:], window, device, state)
    replies = decode(model, logits, state, device)
    return [reply if ok else None for reply, ok in zip(replies, usable)]


def digit_positions(prompt: bytes, key: int) -> list[int]:
    """Where the asked key's five digits stand in its first statement (a run of exactly those
    digits, not part of a longer number)."""
    found = re.search(rb"(?<![0-9])" + str(key).encode() + rb"(?![0-9])", prompt)
    if found is None:
        raise HorizonError(f"key {key} is not stated in the prompt")
    return list(range(found.start(), found.start() + 5))


def answer_with_hits(model: nn.Module, prompts: list[bytes], keys: list[int], window: int,
                     device: torch.device) -> tuple[list[str], Tensor | None, Tensor | None]:
    """:func:`answer`, and for a model with a memory, per prompt and answer digit (B, 5): whether
    the memory's top-K read, at the token that predicts the digit, held the entry written at that
    digit in the fact (induction memory) or its chunk (chunk memory), and (induction memory) the
    softmax weight the read gave that entry (0 where not held; None for the chunk memory): a fact
    held among near-matches that share the softmax gets a small weight. This records what the read
    selected, not that the answer came from it (the causal check, ``causal_check``, tests that).
    Read free-running: after a wrong digit the model asks about its own reply."""
    memory = getattr(model, "memory", None)
    if memory is None:
        return answer(model, prompts, window, device), None, None
    length = len(prompts[0])
    query_pos = torch.arange(length, length + 5, device=device).expand(len(prompts), 5)  # (B, 5): " ", 4 digits
    answer_pos = torch.tensor([digit_positions(p, k) for p, k in zip(prompts, keys)], device=device)  # (B, 5)
    with MemoryProbe(memory, query_pos) as probe:
        replies = answer(model, prompts, window, device)
    found = probe.outcome(answer_pos)
    if memory.entries_per_chunk > 1:
        return replies, found["hit_entry"], found["entry_weight"]  # (B, 5) twice
    return replies, found["hit"], None  # (B, 5)


def prepare_model(model: nn.Module, cfg: PasskeyConfig) -> None:
    """Set the model's memory for asking as ``cfg`` says (read_topk, memory_capacity), and refuse
    a causal check the model cannot take, before any work."""
    set_read_topk(model, cfg.read_topk)
    memory = getattr(model, "memory", None)
    if cfg.causal_check and (memory is None or memory.kind != "induction"):
        raise HorizonError("causal_check swaps the induction memory's entries; this model has "
                           f"{'no memory' if memory is None else f'the {memory.kind} memory'}")
    if cfg.memory_capacity:
        if memory is None:
            raise HorizonError(f"memory_capacity={cfg.memory_capacity} needs a HorizonLM with its memory")
        if memory.top_k > cfg.memory_capacity:
            raise HorizonError(f"memory_capacity={cfg.memory_capacity} is below the read's top-K ({memory.top_k})")
        # The read's selection never holds a full score matrix (ops.topk_read: the fused kernel on a
        # GPU, entry blocks in the torch twin), so a larger memory needs no smaller query blocks.
        memory.capacity = cfg.memory_capacity


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


def score(reply: str | None, key: int) -> bool:
    """The reply's first number is exactly the key: all five digits, no more ("482130" fails)."""
    found = re.search(r"\d+", reply or "")
    return found is not None and found.group() == str(key)


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
    entry["by_cue_overlap"] = by_cue_overlap(cells)
    return entry


OVERLAP_BINS = ((0, 3), (4, 7), (8, 11), (12, 15), (16, None))
"""Cue overlaps tabulated together, in bytes (the default induction key spans 16)."""


def overlap_bin(n: int) -> str:
    """The name of the bin of ``OVERLAP_BINS`` a cue overlap of ``n`` bytes falls in ("8-11", "16+")."""
    for low, high in OVERLAP_BINS:
        if n >= low and (high is None or n <= high):
            return f"{low}-{high}" if high is not None else f"{low}+"
    raise ValueError(f"a cue overlap is a number of bytes, got {n}")


def by_cue_overlap(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials of every cell that ran, grouped by cue overlap: how many, and the share answered
    exactly. An empty bin is left out."""
    won: dict[str, list[bool]] = defaultdict(list)
    for c in cells:
        if c["status"] == "ok":
            for (key, reply), n in zip(c["examples"], c["cue_overlap"]):
                won[overlap_bin(n)].append(score(reply, key))
    return [{"overlap": name, "trials": len(won[name]), "accuracy": sum(won[name]) / len(won[name])}
            for name in (overlap_bin(low) for low, _ in OVERLAP_BINS) if won.get(name)]


def _run_cell(model: nn.Module, haystack: bytes, cfg: PasskeyConfig, device: torch.device, length: int,
              depth: int, bar: tqdm) -> dict[str, Any]:
    """``cfg.trials`` prompts of one length with the asked key at one depth, scored."""
    asked, swap_keys = cell_prompts(haystack, cfg, length, depth)
    keys = [p.key for p in asked]
    replies, hits, weights, without_read, swapped, t0 = [], [], [], [], [], time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for first in range(0, len(asked), cfg.batch):
        group = asked[first : first + cfg.batch]
        try:
            got, hit, weight = answer_with_hits(model, [p.text for p in group], [p.key for p in group], cfg.window,
                                                device)
            if cfg.causal_check:
                with reads_dropped(model.memory):
                    without_read += answer(model, [p.text for p in group], cfg.window, device)
                swapped += swapped_answer(model, group, swap_keys[first : first + cfg.batch], cfg.window, device)
        except torch.cuda.OutOfMemoryError:
            return {"length": length, "depth": depth, "status": "OOM"}
        replies += got
        if hit is not None:
            hits.append(hit.cpu())
        if weight is not None:
            weights.append(weight.cpu())
        bar.update(len(group))
    seconds = time.perf_counter() - t0
    correct = sum(score(reply, key) for reply, key in zip(replies, keys))
    digits = sum(digits_right(reply, key) for reply, key in zip(replies, keys))
    bar.set_postfix(last=f"{length // 1024}K at {depth}%: {correct}/{cfg.trials}")
    cell = {"length": length, "depth": depth, "status": "ok", "trials": cfg.trials, "accuracy": correct / cfg.trials,
            "digit_accuracy": digits / (5 * cfg.trials), "seconds_per_trial": seconds / cfg.trials,
            "examples": [[key, reply] for key, reply in zip(keys, replies)],
            "forms": [p.form for p in asked], "cue_overlap": [p.overlap for p in asked]}
    if device.type == "cuda":  # what asking at this length holds on the device (issue 25: a 10M prompt's memory)
        cell["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if hits:
        cell["memory_hit_by_digit"] = torch.cat(hits).float().mean(0).tolist()  # 5 rates, the first digit first
    if weights:  # the read's mean weight on the fact's own entry, per digit (0 where not held)
        cell["memory_weight_by_digit"] = torch.cat(weights).float().mean(0).tolist()
    memory = getattr(model, "memory", None)
    if memory is not None:
        cell["fact_in_memory"] = sum(fact_in_memory(p, memory.chunk_size, memory.capacity) for p in asked) / len(asked)
    if cfg.causal_check:
        cell["causal_check"] = causal_summary(keys, replies, without_read, swap_keys, swapped)
    return cell


def cell_prompts(haystack: bytes, cfg: PasskeyConfig, length: int, depth: int) -> tuple[list[Prompt], list[int]]:
    """A cell's prompts and the keys the causal check swaps in, drawn from the cell's own seed:
    the same settings and haystack give the same prompts in any run (and again from a results
    file's ``config``)."""
    rng = random.Random(f"{cfg.seed}-{length}-{depth}-{cfg.keys}-{cfg.wording}")
    asked = [build_prompt(haystack, length, depth, cfg.keys, rng, cfg.wording) for _ in range(cfg.trials)]
    return asked, [rng.randint(10000, 99999) for _ in asked]


def fact_in_memory(prompt: Prompt, chunk_size: int, capacity: int) -> bool:
    """Whether the asked key's first digit is among the entries the token predicting the answer
    may read: its chunk completed before that token's chunk, and one of the last ``capacity``
    (the memory's visibility rule). False means only the recurrent state could carry the fact."""
    first = digit_positions(prompt.text, prompt.key)[0]
    seen = (len(prompt.text) - 1) // chunk_size  # chunks completed before the last prompt token
    return seen - capacity <= first // chunk_size < seen


def causal_summary(keys: list[int], replies: list[str], without_read: list[str], swap_keys: list[int],
                   swapped: list[str | None]) -> dict[str, Any]:
    """Whether the answers follow the memory: accuracy with the read removed, and with the fact's
    entries swapped the share of replies that are the swapped-in key (and that stay the original)."""
    asked = [i for i, reply in enumerate(swapped) if reply is not None]
    n = max(1, len(asked))
    return {"accuracy_without_read": sum(map(score, without_read, keys)) / len(keys),
            "swap_trials": len(asked),
            "follows_swap": sum(score(swapped[i], swap_keys[i]) for i in asked) / n,
            "keeps_original_under_swap": sum(score(swapped[i], keys[i]) for i in asked) / n,
            "digits_following_swap": sum(digits_right(swapped[i], swap_keys[i]) for i in asked) / (5 * n),
            "digits_keeping_original": sum(digits_right(swapped[i], keys[i]) for i in asked) / (5 * n),
            "examples": [[keys[i], without_read[i], swap_keys[i], swapped[i]] for i in range(len(keys))]}


def format_table(name: str, entry: dict[str, Any]) -> str:
    """The accuracy of every cell as a small text table: a row per depth, a column per length."""
    lengths = sorted({c["length"] for c in entry["cells"]})
    depths = sorted({c["depth"] for c in entry["cells"]})
    shown = {(c["length"], c["depth"]): (f"{c['accuracy']:.0%}" + ("*" if c.get("fact_in_memory", 1) < 1 else ""))
             if c["status"] == "ok" else c["status"] for c in entry["cells"]}
    heads = ["depth"] + [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths]
    rows = [[f"{d}%"] + [shown.get((n, d), "-") for n in lengths] for d in depths]
    widths = [max(len(row[i]) for row in [heads, *rows]) for i in range(len(heads))]
    lines = [f"passkey accuracy, {name} (rows: depth of the key; columns: context length in tokens)"]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [heads, *rows]]
    if any("*" in v for v in shown.values()):
        lines.append("* the fact lay outside the memory's window in some trials (raise --memory-capacity)")
    if entry.get("by_cue_overlap"):
        lines.append("by cue overlap (bytes the question's end shares with the fact's, before the value): " + ", ".join(
            f"{row['overlap']}: {row['accuracy']:.0%} of {row['trials']}" for row in entry["by_cue_overlap"]))
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


def entry_name(label: str, keys: int, wording: str = "benchmark") -> str:
    """The name of a model's entry in the results file: its label, number of keys and wording."""
    wording_name = {"benchmark": "", "heldout": ", held-out wording", "train": ", training wording"}[wording]
    return f"{label} ({keys} key{'s' if keys > 1 else ''}{wording_name})"


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
    name = entry_name(label, entry["keys"], entry["config"].get("wording", "benchmark"))
    results["models"][name] = {**entry, "environment": environment}
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
