"""``horizon bench recall``: does the memory retrieve? The first two rungs of issue 12's ladder.

Rung 1, in-window multi-query associative recall (MQAR, Zoology, arXiv 2312.04927): every model
(HorizonLM, its ablations, the transformer) at every width trains on a round-robin mix of the
``cells`` (sequence length : pairs) and is scored on held-out sequences of each test cell:
accuracy against width and sequence length, as in Zoology's figure.

Rung 2, cross-window recall: the pairs in the first window, ``G`` tokens of filler, then the
queries, fed window by window with the state carried. Training mixes ``train_gaps`` (a gap of 0
keeps the queries in the pairs' window: entries carried from an earlier window are detached, so
only same-window episodes teach the memory to write); scoring runs every gap in ``gaps``. The
transformer trains and scores only where the whole sequence fits its window.

Every model gets a learning-rate sweep (each candidate scored on validation sequences) and a
step or time budget; beside accuracy, every query records whether the memory's top-K read
contained the entry of the chunk that holds its answer (``bench/recall_probe.py``).
Results are added to ``out`` (one entry per rung, model, width, depth, filler and label; an
existing entry is replaced only with ``replace``), each entry written again after every scored
cell, and a PNG is drawn beside it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from horizonlm.bench.common import environment, parse_ints
from horizonlm.bench.quality import ABLATIONS
from horizonlm.bench.recall_data import (
    FILLERS,
    Filler,
    RecallBatch,
    batch_generator,
    check_gap,
    check_mqar_length,
    check_pairs,
    gap_batch,
    load_prose,
    mqar_batch,
    pair_vocab,
)
from horizonlm.bench.recall_plot import plot_recall
from horizonlm.bench.recall_train import Budget, evaluate, train_model
from horizonlm.checkpoint import MODEL_KINDS, Checkpoint, build_model, load_checkpoint
from horizonlm.config import HorizonConfig
from horizonlm.data.tokenizers import require_byte_level
from horizonlm.devices import resolve_device
from horizonlm.errors import HorizonError
from horizonlm.fileio import atomic_write_json
from horizonlm.train import OptimizerSettings


def parse_cells(text: str) -> list[tuple[int, int]]:
    """``"256:16,1024:64"`` -> ``[(256, 16), (1024, 64)]`` (sequence length : pairs)."""
    cells = []
    for item in text.split(","):
        if not item.strip():
            continue
        parts = item.split(":")
        if len(parts) != 2:
            raise ValueError(f"a cell is SEQ_LEN:PAIRS, got {item.strip()!r}")
        cells.append((int(parts[0]), int(parts[1])))
    return cells


def parse_floats(text: str) -> list[float]:
    """``"0.001,0.003"`` -> ``[0.001, 0.003]`` (the learning rates of the sweep)."""
    return [float(x) for x in text.split(",") if x.strip()]


@dataclass
class RecallConfig(OptimizerSettings):
    """Settings of ``horizon bench recall``."""

    rungs: str = "1,2"
    """Rungs to run: 1 (in-window MQAR), 2 (cross-window recall), or both."""
    models: str = "horizon,transformer,horizon_no_ssm,horizon_no_conv,horizon_no_supervisor,horizon_no_memory"
    """Comma-separated models (the ablations of ``bench quality``)."""
    preset: str = "small"
    """HorizonLM preset the models start from; width and depth come from ``widths`` and ``layers``
    (the GLU MLP and the supervisor scaled with the width); the transformer matches each."""
    widths: str = "64,128,256"
    """Rung 1: model widths (d_model)."""
    layers: int = 2
    """Blocks per model (Zoology's MQAR models have 2)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """HorizonConfig fields that replace the preset's in every HorizonLM (e.g. memory_capacity,
    chunk_size, ssm_kind); the transformer and a peer (``gla``) match the HorizonLM they
    make (width, depth, MLP) and ignore the rest."""
    init_checkpoint: str = ""
    """Fine-tune this checkpoint (e.g. a language model pretrained on prose) instead of training
    ``models`` from scratch: every learning-rate candidate starts from its weights. Its
    vocabulary must equal ``vocab_size``, and be byte level for the prose filler."""
    vocab_size: int = 8192
    """V: token vocabulary; keys and values come from its two halves (256 and byte-level pairs for prose)."""
    filler: str = "random"
    """``random`` tokens, or ``prose`` (byte level, the shipped Shakespeare: train split for
    training, valid for the sweep, test for scoring)."""
    cells: str = "256:16,512:32,1024:64"
    """Rung 1: training cells SEQ_LEN:PAIRS, mixed round-robin, one cell per batch."""
    test_cells: str = ""
    """Rung 1: scored cells SEQ_LEN:PAIRS (empty: the training cells)."""
    query_power: float = 0.01
    """Rung 1: query slots are drawn with weight (slot + 1) ** (power - 1) (Zoology's 0.01:
    most queries soon after the pairs; 1: uniform)."""
    cross_width: int = 128
    """Rung 2: width (d_model) of every model."""
    cross_pairs: int = 16
    """Rung 2: key-value pairs per sequence."""
    window: int = 2048
    """Rung 2: tokens per call when feeding a sequence (HorizonLM carries its state across calls);
    also the transformer's context: it runs only where the whole sequence fits."""
    train_gaps: str = "0,512,2048,8192"
    """Rung 2: gaps G (tokens) trained on, round-robin, one gap per batch."""
    gaps: str = "1024,4096,16384,65536,262144,1048576"
    """Rung 2: gaps G (tokens) scored. The memory reaches back memory_capacity * chunk_size
    tokens: raise memory_capacity (model_overrides) for the longest gaps."""
    lrs: str = "0.0003,0.001,0.003"
    """Learning rates of the sweep; one value skips the sweep."""
    steps: int = 0
    """Step budget of each model's training (0: none; with ``minutes``, whichever ends first)."""
    minutes: float = 5.0
    """Time budget of each model's training, minutes of training steps (0: none)."""
    sweep_steps: int = 0
    """Step budget of each sweep candidate (0 with sweep_minutes 0: every candidate trains with
    the full budget and the best one is kept, Zoology's protocol)."""
    sweep_minutes: float = 1.0
    """Time budget of each sweep candidate, minutes."""
    batch_size: int = 64
    """Sequences per training step."""
    warmup: int = 100
    """Linear warm-up steps (the optimiser's other settings, shared with ``horizon train``, come from
    :class:`horizonlm.train.OptimizerSettings`; each run caps the S4D rate ``ssm_lr`` at its ``lr``)."""
    valid_sequences: int = 256
    """Held-out sequences per cell (rung 1) or training gap (rung 2) that score a sweep candidate."""
    eval_sequences: int = 1000
    """Rung 1: held-out test sequences per cell."""
    cross_eval_sequences: int = 128
    """Rung 2: held-out test sequences per gap."""
    eval_batch: int = 64
    """Sequences per evaluation batch."""
    eval_topk: int = 0
    """Entries the memory reads per token when scoring (0: the model's own ``memory_topk``, the
    one it trained with). Fewer makes the read's softmax give the best entry all its weight."""
    log_every: int = 100
    """Record the training loss and accuracy every this many steps."""
    seed: int = 0
    """Seed of the initialisation and of every sequence."""
    label: str = ""
    """Tag added to every entry's name, to keep variants (other overrides) apart in one file."""
    replace: bool = False
    """Replace entries of the same name already in ``out`` (otherwise such a run is refused)."""
    out: str = "bench/results/recall.json"
    """Results file, added to; the PNG is drawn beside it from all its entries."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""

    def __post_init__(self) -> None:
        rungs = self.rung_list
        if not rungs or any(r not in (1, 2) for r in rungs):
            raise ValueError(f"rungs must name 1, 2 or both, got {self.rungs!r}")
        for name in self.model_list:
            if name not in ABLATIONS:
                raise ValueError(f"unknown model {name!r}; choose from {', '.join(ABLATIONS)}")
        if not self.model_list and not self.init_checkpoint:
            raise ValueError("models must name at least one model")
        if self.filler not in FILLERS:
            raise ValueError(f"filler must be one of {FILLERS}, got {self.filler!r}")
        for name in ("layers", "cross_width", "window", "batch_size", "valid_sequences", "eval_sequences",
                     "cross_eval_sequences", "eval_batch", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "sweep_steps", "warmup", "eval_topk"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.minutes < 0 or self.sweep_minutes < 0:
            raise ValueError(f"minutes and sweep_minutes must be >= 0, got {self.minutes}, {self.sweep_minutes}")
        if not self.steps and not self.minutes:
            raise ValueError("give a budget: steps or minutes (or both) must be > 0")
        lrs = parse_floats(self.lrs)
        if not lrs or any(lr <= 0 for lr in lrs) or self.ssm_lr <= 0:
            raise ValueError(f"lrs need at least one value and every rate must be > 0, got {self.lrs!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.query_power <= 1:
            raise ValueError(f"query_power must be in (0, 1], got {self.query_power}")
        if any(w < 1 for w in self.width_list) or not self.width_list:
            raise ValueError(f"widths need at least one positive value, got {self.widths!r}")
        vocab = pair_vocab(self.vocab_size, self.filler)
        if 1 in rungs:
            self._check_rung1(vocab)
        if 2 in rungs:
            self._check_rung2(vocab)

    def _check_rung1(self, vocab) -> None:
        """Every cell must fit the vocabulary and hold its pairs and queries."""
        cells = self.train_cells + self.scored_cells
        if not cells:
            raise ValueError("rung 1 needs at least one cell SEQ_LEN:PAIRS")
        for seq_len, pairs in cells:
            check_pairs(pairs, vocab, self.vocab_size)
            check_mqar_length(seq_len, pairs)

    def _check_rung2(self, vocab) -> None:
        """Pairs fit the vocabulary and the first window, gaps are lengths, and the transformer
        has something to train on."""
        check_pairs(self.cross_pairs, vocab, self.vocab_size)
        if not parse_ints(self.train_gaps) or not parse_ints(self.gaps):
            raise ValueError(f"train_gaps and gaps need a value each, got {self.train_gaps!r}, {self.gaps!r}")
        for gap in parse_ints(self.train_gaps) + parse_ints(self.gaps):
            check_gap(gap)
        if self.window < 2 * self.cross_pairs:
            raise ValueError(f"window={self.window} cannot hold the {self.cross_pairs} pairs (2 tokens each) "
                             "in the first window")
        transformer = "transformer" in self.model_list and not self.init_checkpoint
        if transformer and not self.fitting_gaps(parse_ints(self.train_gaps)):
            raise ValueError(f"no training gap fits the transformer's window of {self.window} tokens "
                             f"(a sequence is 4 * cross_pairs + gap tokens)")

    @property
    def rung_list(self) -> list[int]:
        return parse_ints(self.rungs)

    @property
    def model_list(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]

    @property
    def width_list(self) -> list[int]:
        return parse_ints(self.widths)

    @property
    def train_cells(self) -> list[tuple[int, int]]:
        return parse_cells(self.cells)

    @property
    def scored_cells(self) -> list[tuple[int, int]]:
        return parse_cells(self.test_cells) if self.test_cells.strip() else self.train_cells

    def fitting_gaps(self, gaps: list[int]) -> list[int]:
        """The gaps whose whole sequence fits one window (the transformer's context)."""
        return [g for g in gaps if 4 * self.cross_pairs + g <= self.window]


@dataclass(frozen=True)
class RunPlan:
    """One model to train and score on one rung."""

    rung: int
    """1 or 2."""
    name: str
    """Model name (an ablation of ``bench quality``, or ``KIND+init`` for a checkpoint)."""
    kind: str
    """``horizon``, ``transformer`` or a peer (``gla``)."""
    model_config: dict[str, Any]
    """The model's config (the fields of its kind's config class)."""
    key: str
    """Name of the results entry."""


def scaled_config(cfg: RecallConfig, name: str, width: int) -> tuple[str, dict[str, Any]]:
    """The preset at ``width`` and ``layers``: MLP and supervisor widths scale with the model's,
    so the shape stays the preset's; the transformer and a peer match the HorizonLM of that width
    (an entry's switches then set fields of their own config)."""
    kind, switches = ABLATIONS[name]
    base = HorizonConfig.preset(cfg.preset)
    scale = width / base.d_model
    fields = {"vocab_size": cfg.vocab_size, "d_model": width, "n_layers": cfg.layers,
              "mlp_hidden": max(1, round(base.mlp_hidden * scale)),
              "supervisor_dim": max(1, round(base.supervisor_dim * scale))}
    try:
        own = switches if kind == "horizon" else {}
        horizon = HorizonConfig.preset(cfg.preset, **{**fields, **own, **cfg.model_overrides})
        if kind == "horizon":
            return kind, horizon.to_dict()
        matched = MODEL_KINDS[kind][1].matching(horizon)
        return kind, type(matched).from_dict({**matched.to_dict(), **switches}).to_dict()
    except (TypeError, ValueError) as err:
        raise HorizonError(f"invalid model settings for {name} at width {width}: {err}") from err


def entry_key(cfg: RecallConfig, rung: int, name: str, model_config: dict[str, Any]) -> str:
    """What makes an entry distinct: rung, model, width, depth, vocabulary, filler (and window), label."""
    key = (f"rung{rung} {name} d{model_config['d_model']} l{model_config['n_layers']} "
           f"v{model_config['vocab_size']} {cfg.filler}")
    if rung == 2:
        key += f" w{cfg.window}"
    return key + (f" [{cfg.label}]" if cfg.label else "")


def plan_runs(cfg: RecallConfig, init: Checkpoint | None) -> list[RunPlan]:
    """Every (rung, model, width) of the grid, configs checked before any training starts."""
    plans = []
    for rung in cfg.rung_list:
        if init is not None:
            kind, config = init.info["kind"], init.info["config"]
            plans.append(RunPlan(rung, f"{kind}+init", kind, config, entry_key(cfg, rung, f"{kind}+init", config)))
            continue
        widths = cfg.width_list if rung == 1 else [cfg.cross_width]
        for width in widths:
            for name in cfg.model_list:
                kind, config = scaled_config(cfg, name, width)
                build_model(kind, config)  # an invalid shape fails here, before hours of training
                if kind == "horizon" and cfg.eval_topk > config["memory_capacity"]:
                    raise HorizonError(f"eval_topk={cfg.eval_topk} exceeds {name}'s memory_capacity="
                                       f"{config['memory_capacity']}")
                plans.append(RunPlan(rung, name, kind, config, entry_key(cfg, rung, name, config)))
    return plans


def load_init(cfg: RecallConfig) -> Checkpoint | None:
    """The checkpoint to fine-tune, checked against the task: byte level for prose, same vocabulary."""
    if not cfg.init_checkpoint:
        return None
    ckpt = load_checkpoint(cfg.init_checkpoint)
    if cfg.filler == "prose":
        require_byte_level(ckpt.info.get("tokenizer", {}),
                           f"the prose filler feeds raw bytes; checkpoint {ckpt.path} cannot read them")
    vocab = ckpt.info["config"]["vocab_size"]
    if vocab != cfg.vocab_size:
        raise HorizonError(f"checkpoint {ckpt.path} has a vocabulary of {vocab}, "
                           f"the task uses vocab_size={cfg.vocab_size}")
    return ckpt


@dataclass(frozen=True)
class Task:
    """How one rung makes, feeds and scores its sequences for one model."""

    sample: Callable[[int], RecallBatch]
    """Training batch of a step."""
    window: Callable[[RecallBatch], int]
    """Tokens per call for a batch."""
    valid: Callable[[], Iterator[RecallBatch]]
    """Validation batches (the sweep's score)."""
    test: Callable[[nn.Module], Iterator[dict[str, Any]]]
    """Scores a trained model on every test cell of the rung, one cell at a time."""


def _batches(count: int, size: int, make: Callable[[int, torch.Generator], RecallBatch],
             generator: Callable[[int], torch.Generator]) -> Iterator[RecallBatch]:
    """``count`` sequences in batches of at most ``size``, batch ``i`` drawn from ``generator(i)``."""
    for i, start in enumerate(range(0, count, size)):
        yield make(min(size, count - start), generator(i))


def whole(batch: RecallBatch) -> int:
    """One call for the whole sequence."""
    return batch.tokens.shape[1]


def rung1_task(cfg: RecallConfig, fillers: dict[str, Filler], device: torch.device) -> Task:
    """MQAR in one window: the whole sequence in one call."""
    cells = cfg.train_cells

    def make(split: str, seq_len: int, pairs: int) -> Callable[[int, torch.Generator], RecallBatch]:
        return lambda size, gen: mqar_batch(size, seq_len, pairs, fillers[split], cfg.query_power, gen, device)

    def sample(step: int) -> RecallBatch:
        seq_len, pairs = cells[step % len(cells)]
        return make("train", seq_len, pairs)(cfg.batch_size, batch_generator(cfg.seed, "train", 1, step, device=device))

    def cell_batches(split: str, seq_len: int, pairs: int, count: int) -> Iterator[RecallBatch]:
        return _batches(count, cfg.eval_batch, make(split, seq_len, pairs),
                        lambda i: batch_generator(cfg.seed, split, 1, seq_len, pairs, i, device=device))

    def valid() -> Iterator[RecallBatch]:
        for seq_len, pairs in cells:
            yield from cell_batches("valid", seq_len, pairs, cfg.valid_sequences)

    def test(model: nn.Module) -> Iterator[dict[str, Any]]:
        for seq_len, pairs in cfg.scored_cells:
            yield {"seq_len": seq_len, "pairs": pairs,
                   **evaluate(model, cell_batches("test", seq_len, pairs, cfg.eval_sequences), whole, cfg.bf16)}

    return Task(sample=sample, window=whole, valid=valid, test=test)


def rung2_task(cfg: RecallConfig, fillers: dict[str, Filler], device: torch.device, plan: RunPlan) -> Task:
    """Cross-window recall: HorizonLM (and a peer that carries its state) in windows with its state
    carried; the transformer (or a peer that does not) in one call, only where the sequence fits
    its window."""
    transformer = plan.kind == "transformer" or plan.model_config.get("carry_state") is False
    train_gaps = parse_ints(cfg.train_gaps)
    train_gaps = cfg.fitting_gaps(train_gaps) if transformer else train_gaps
    if not train_gaps:
        raise HorizonError(f"no training gap fits {plan.name}'s window of {cfg.window} tokens")
    pairs = cfg.cross_pairs

    def make(split: str, gap: int) -> Callable[[int, torch.Generator], RecallBatch]:
        return lambda size, gen: gap_batch(size, pairs, gap, fillers[split], gen, device)

    def window(batch: RecallBatch) -> int:
        return batch.tokens.shape[1] if transformer else cfg.window

    def sample(step: int) -> RecallBatch:
        gap = train_gaps[step % len(train_gaps)]
        return make("train", gap)(cfg.batch_size, batch_generator(cfg.seed, "train", 2, step, device=device))

    def gap_batches(split: str, gap: int, count: int) -> Iterator[RecallBatch]:
        return _batches(count, cfg.eval_batch, make(split, gap),
                        lambda i: batch_generator(cfg.seed, split, 2, gap, pairs, i, device=device))

    def valid() -> Iterator[RecallBatch]:
        for gap in train_gaps:
            yield from gap_batches("valid", gap, cfg.valid_sequences)

    def test(model: nn.Module) -> Iterator[dict[str, Any]]:
        for gap in parse_ints(cfg.gaps):
            cell = {"gap": gap, "pairs": pairs, "tokens": 4 * pairs + gap}
            if transformer and not cfg.fitting_gaps([gap]):
                yield {**cell, "status": "not run",
                       "reason": f"longer than {plan.name}'s window of {cfg.window} tokens"}
                continue
            start = time.perf_counter()
            scores = evaluate(model, gap_batches("test", gap, cfg.cross_eval_sequences), window, cfg.bf16)
            yield {**cell, "status": "ok", **scores, "eval_seconds": time.perf_counter() - start}

    return Task(sample=sample, window=window, valid=valid, test=test)


def make_model(plan: RunPlan, init: Checkpoint | None, seed: int, device: torch.device) -> nn.Module:
    """A fresh model (the same initialisation for every learning rate), or a copy of the checkpoint's."""
    torch.manual_seed(seed)
    model = copy.deepcopy(init.model) if init is not None else build_model(plan.kind, plan.model_config)
    return model.to(device)


def optim_settings(cfg: RecallConfig, lr: float) -> OptimizerSettings:
    """The run's optimiser at peak rate ``lr``; the SSM rate never exceeds it."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(OptimizerSettings)}
    return OptimizerSettings(**{**shared, "ssm_lr": min(lr, cfg.ssm_lr)})


def beats(candidate: dict[str, Any], best: dict[str, Any]) -> bool:
    """Whether a sweep candidate beats the best so far. Accuracy decides where the two differ by
    more than two standard errors of their difference, ``2 sqrt(2 p (1 - p) / n)`` (``p`` pooled,
    ``n`` questions each); within that noise (typically both at chance after a short sweep) the
    lower validation loss decides, a smoother signal than a handful of lucky answers."""
    n = min(candidate["valid_queries"], best["valid_queries"])
    p = (candidate["valid_accuracy"] + best["valid_accuracy"]) / 2
    margin = 2 * math.sqrt(2 * p * (1 - p) / n)
    diff = candidate["valid_accuracy"] - best["valid_accuracy"]
    if abs(diff) > margin:
        return diff > 0
    return candidate["valid_loss"] < best["valid_loss"]


def sweep_and_train(cfg: RecallConfig, plan: RunPlan, task: Task, init: Checkpoint | None,
                    device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The sweep (each candidate scored on validation sequences: accuracy beyond its noise, else
    loss; see :func:`beats`), then the chosen rate trained with the full budget; under Zoology's
    protocol the best full-budget candidate is the result. Returns the trained model and its record."""
    lrs = parse_floats(cfg.lrs)
    full = Budget(cfg.steps, cfg.minutes)
    zoology = len(lrs) > 1 and not (cfg.sweep_steps or cfg.sweep_minutes)
    sweep_budget = full if zoology else Budget(cfg.sweep_steps, cfg.sweep_minutes)
    sweep, best, best_model, best_run = [], None, None, None
    for lr in lrs if len(lrs) > 1 else []:
        model = make_model(plan, init, cfg.seed, device)
        run = train_model(model, task.sample, task.window, optim_settings(cfg, lr), lr, sweep_budget, cfg.bf16,
                          cfg.log_every)
        valid = evaluate(model, task.valid(), task.window, cfg.bf16)
        sweep.append({"lr": lr, "valid_accuracy": valid["accuracy"], "valid_loss": valid["loss"],
                      "valid_queries": valid["queries"], "steps": run["steps"], "train_seconds": run["train_seconds"]})
        print(json.dumps({"rung": plan.rung, "model": plan.name, "sweep": sweep[-1]}), flush=True)
        if best is None or beats(sweep[-1], best):
            best, best_model, best_run = sweep[-1], model, run
    lr = best["lr"] if best is not None else lrs[0]
    if not zoology:
        best_model = make_model(plan, init, cfg.seed, device)
        best_run = train_model(best_model, task.sample, task.window, optim_settings(cfg, lr), lr, full, cfg.bf16,
                               cfg.log_every)
    selection = ("best full-budget candidate" if zoology else "own sweep") if sweep else "given"
    return best_model, {"lr": lr, "lr_selection": selection, "sweep": sweep, **best_run}


def run_plan(cfg: RecallConfig, plan: RunPlan, fillers: dict[str, Filler], init: Checkpoint | None,
             device: torch.device, writer: EntryWriter) -> dict[str, Any]:
    """Train one model of the grid and score it on its rung's test cells. The entry is written
    after every scored cell (``complete`` false until the last), so a run cut short keeps the
    cells it scored."""
    task = rung1_task(cfg, fillers, device) if plan.rung == 1 else rung2_task(cfg, fillers, device, plan)
    model, record = sweep_and_train(cfg, plan, task, init, device)
    if cfg.eval_topk and getattr(model, "memory", None) is not None:
        model.memory.top_k = cfg.eval_topk  # the scoring read only; training used the model's own K
    vocab = pair_vocab(cfg.vocab_size, cfg.filler)
    entry = {"rung": plan.rung, "model": plan.name, "kind": plan.kind, "width": plan.model_config["d_model"],
             "layers": plan.model_config["n_layers"], "vocab_size": cfg.vocab_size, "filler": cfg.filler,
             "label": cfg.label, "window": cfg.window if plan.rung == 2 else None,
             "init_checkpoint": cfg.init_checkpoint or None,
             "chance_accuracy": 1 / (vocab.value_hi - vocab.value_lo),
             "parameters": sum(p.numel() for p in model.parameters()), "model_config": plan.model_config,
             "budget": {"steps": cfg.steps, "minutes": cfg.minutes, "sweep_steps": cfg.sweep_steps,
                        "sweep_minutes": cfg.sweep_minutes, "batch_size": cfg.batch_size},
             **record, "cells": [], "complete": False, "environment": environment(), "config": asdict(cfg)}
    for cell in task.test(model):
        entry["cells"].append(cell)
        shown = {k: cell.get(k) for k in ("seq_len", "gap", "pairs", "accuracy", "hit_rate", "entry_hit_rate",
                                          "eval_seconds")}
        print(json.dumps({"rung": plan.rung, "model": plan.name, **shown}), flush=True)
        writer.write(entry)
    entry["complete"] = True
    writer.write(entry)
    return entry


def read_results(path: Path) -> dict[str, Any]:
    """The results file, or an empty one; a file that is not a recall results file is an error
    (never overwritten)."""
    if not path.is_file():
        return {"entries": {}}
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HorizonError(f"results file {path} is not valid JSON ({err}); move it aside") from err
    if not isinstance(results, dict) or not isinstance(results.get("entries"), dict):
        raise HorizonError(f"{path} is not a recall results file (no 'entries'); choose another --out")
    return results


def check_free(path: Path, keys: list[str], replace: bool) -> None:
    """Refuse, before any training, to overwrite entries unless asked to."""
    taken = [k for k in keys if k in read_results(path)["entries"]]
    if taken and not replace:
        raise HorizonError(f"{path} already holds {', '.join(taken)}; pass --replace to overwrite them, "
                           "--label to keep both, or another --out")


class EntryWriter:
    """Writes one run's entry into the results file, again each time it grows: the first write
    takes the entry's name (a name taken meanwhile by another run, without ``replace``, gets a
    numbered suffix instead of overwriting it), later writes update that same entry. Every write
    reads the file as it is now (entries written meanwhile are kept) and replaces it atomically."""

    def __init__(self, path: Path, key: str, replace: bool) -> None:
        self.path = path
        self.key = key
        self.replace = replace
        self.name: str | None = None
        self.results: dict[str, Any] = {"entries": {}}

    def write(self, entry: dict[str, Any]) -> None:
        results = read_results(self.path)
        if self.name is None:
            name, n = self.key, 2
            while name in results["entries"] and not self.replace:
                name, n = f"{self.key} #{n}", n + 1
            if name != self.key:
                print(f"{self.key} appeared in {self.path} during this run; saved as {name}", flush=True)
            self.name = name
        results["entries"][self.name] = entry
        atomic_write_json(self.path, results)
        self.results = results


def make_fillers(cfg: RecallConfig, device: torch.device) -> dict[str, Filler]:
    """Filler per split: prose comes from the split's own text, so test prose is never trained on."""
    vocab = pair_vocab(cfg.vocab_size, cfg.filler)
    prose = cfg.filler == "prose"
    return {split: Filler(cfg.vocab_size, vocab, load_prose(split, device) if prose else None)
            for split in ("train", "valid", "test")}


def run_recall(cfg: RecallConfig) -> dict[str, Any]:
    """Every run of the grid, each saved as soon as it is scored; the PNG from the whole file."""
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    init = load_init(cfg)
    plans = plan_runs(cfg, init)
    check_free(out, [p.key for p in plans], cfg.replace)
    fillers = make_fillers(cfg, device)
    results = read_results(out)
    for plan in plans:
        writer = EntryWriter(out, plan.key, cfg.replace)
        entry = run_plan(cfg, plan, fillers, init, device, writer)
        results = writer.results
        print(json.dumps({"entry": plan.key, "lr": entry["lr"], "steps": entry["steps"],
                          "accuracy": [c.get("accuracy") for c in entry["cells"]]}), flush=True)
    plot_recall(results, out.with_suffix(".png"))
    return results
