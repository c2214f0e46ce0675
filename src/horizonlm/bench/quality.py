"""``horizon bench quality``: language-modelling quality at equal training time, with ablations.

Every model trains with the same loop, data, tokens per step and wall-clock budget; its
learning rate is the best of a short sweep (each candidate trained for ``sweep_minutes``,
scored on the valid split). Then: bits per byte on the novels test split (each book one
stream, state carried; and again with the state reset every training window), on the raw
WikiText test text, and word-level perplexity on the WikiText-103 test tokens converted from the
byte model's total loss (out of domain: no WikiText training split is used).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import queue
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from horizonlm.bench.common import environment, save_figure
from horizonlm.bench.quality_summary import format_quality_table, score_value, summarize_quality
from horizonlm.checkpoint import MODEL_KINDS, build_model, carries_state, load_checkpoint
from horizonlm.config import HorizonConfig
from horizonlm.data.stream import load_meta, open_split
from horizonlm.devices import resolve_device
from horizonlm.errors import HorizonError
from horizonlm.evaluate import evaluate_streams, wikitext_word_count, word_perplexity
from horizonlm.fileio import atomic_write_json
from horizonlm.train import TrainConfig, train

ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "horizon": ("horizon", {}),
    "transformer": ("transformer", {}),
    "horizon_no_ssm": ("horizon", {"use_ssm": False}),
    "horizon_no_conv": ("horizon", {"use_conv": False}),
    "horizon_no_supervisor": ("horizon", {"use_supervisor": False}),
    "horizon_no_memory": ("horizon", {"use_memory": False}),
    "horizon_ungated": ("horizon", {"ssm_gate": "none"}),
    # The pure-torch SSD keeps (B, H, chunks, T, T) decay tensors for backward in every block: at
    # 16 x 8192 tokens on the base preset they overflow the H200's 140 GiB, so each block is recomputed.
    "horizon_selective": ("horizon", {"ssm_kind": "selective", "ssm_recompute": True}),
    # The paper's literal memory, the default before the induction memory: one entry per completed
    # chunk (its last token's state) read after the supervisor, 8192 chunks (1M tokens at base).
    "horizon_chunk_memory": ("horizon", {"memory_kind": "chunk", "memory_key_span": 1, "memory_capacity": 8192}),
    # The induction memory keyed by the hidden state after two blocks instead of the embeddings:
    # its keys can carry a label a clause back, which 16 bytes of the token stream cannot.
    "horizon_memory_layer2": ("horizon", {"memory_layer": 2}),
    # The induction memory trained against a long memory: 4096 chunks (512K tokens at base, a
    # stream's whole life between cold restarts) instead of 64, so the read learns to pick the fact
    # out of the crowd of near-matches a long prompt brings (the default keeps a few windows).
    "horizon_long_memory": ("horizon", {"memory_capacity": 4096}),
    # Between the two: 1024 chunks (128K tokens, 16 training windows), a quarter of the long
    # memory's read in training.
    "horizon_memory_128k": ("horizon", {"memory_capacity": 1024}),
    # The default without the memory's read added again before the final norm (LateRead): the read
    # reaches the logits only through every block (RESULTS.md 1.3d).
    "horizon_no_late_read": ("horizon", {"memory_late_read": False}),
    # The default with a fixed tau instead of one grown with the log of the entries a token sees
    # (count_tau): the default from 4 December 2026 until the grown tau won (RESULTS.md 1.3e).
    "horizon_no_tau_growth": ("horizon", {"memory_tau_growth": False}),
    # The induction memory as it first became the default (f25841f): neither the late read nor the
    # grown tau (its protocol entry was measured as the default then).
    "horizon_plain_induction": ("horizon", {"memory_late_read": False, "memory_tau_growth": False}),
    # The default with the count cache: its output mixed with exact counts of what followed the
    # longest of these contexts earlier in the stream (ops/count_cache.py), the lengths the
    # headroom bench measured (RESULTS.md 1.2d); blocks of 2M positions.
    "horizon_count_cache": ("horizon", {"count_lengths": (8, 12, 16, 24, 32, 48, 64)}),
    # The same with contexts from 4 bytes: at CPU scale far contexts of 4-6 bytes offered 0.04 more
    # (RESULTS.md 1.2g).
    "horizon_count_cache_short": ("horizon", {"count_lengths": (4, 5, 6, 8, 12, 16, 24, 32, 48, 64)}),
    # A peer, not an ablation: flash-linear-attention's GLA (horizonlm.peers.gla, extra [peers], a
    # GPU), state carried across windows as HorizonLM's.
    "gla": ("gla", {}),
}


PROTOCOLS: dict[str, dict[str, Any]] = {
    # One H200 per call: each model's sweep (3 rates x 1.5 min) in one call, its main run (8 min)
    # in another, the whole test split scored; the same tokens per step and the same data mix for
    # every model. The fields it fixes replace the config's (flags for them have no effect).
    "h200-8min": dict(preset="base", minutes=8.0, sweep_minutes=1.5, lrs="0.0006,0.0012,0.0024", batch_size=16,
                      seq_len=8192, eval_window=8192, max_eval_tokens=0, reset_stream_every=64,
                      memory_read_dropout=0.1, recall_every=2, recall_rate=1.0, recall_keys=4, recall_weight=5.0,
                      recall_same_window=0.5, recall_cloze=0.0, ablation_lr_from_horizon=False),
}
"""Named protocols: settings fixed in code, recorded in the results file by name and value."""
# The same on prose alone (no recall episodes in the mix), in its own results file: what the recall
# mix costs a model's language modelling (issue 23: within 0.02 bits/byte).
PROTOCOLS["h200-8min-prose"] = {**PROTOCOLS["h200-8min"], "recall_every": 0}


@dataclass
class QualityConfig:
    """Settings of ``horizon bench quality``."""

    data: str = "runs/data/novels"
    """Prepared novels (byte level): train for training, valid for the sweep, test to score."""
    wikitext_raw: str = "../shared/data/wikitext/wikitext.wiki.test.raw"
    """Raw WikiText test text, scored as bytes ('' to skip)."""
    wikitext_tokens: str = "../shared/data/wikitext/wikitext-103.wiki.test.tokens"
    """WikiText-103 test tokens, for word-level perplexity from the byte loss ('' to skip)."""
    models: str = "horizon,transformer,horizon_no_ssm,horizon_no_conv,horizon_no_supervisor,horizon_no_memory"
    """Comma-separated models (see ABLATIONS)."""
    preset: str = "base"
    """Model preset of every model."""
    minutes: float = 5.0
    """Training budget per model (wall clock of the training steps)."""
    lrs: str = "0.0006,0.0012,0.0024"
    """Learning rates of the sweep; one value skips the sweep."""
    sweep_minutes: float = 1.0
    """Training budget per sweep candidate."""
    batch_size: int = 16
    """Streams per step."""
    seq_len: int = 8192
    """Tokens per window (the transformer's training context)."""
    eval_window: int = 8192
    """Window when streaming the test sets (state carried between windows)."""
    max_eval_tokens: int = 0
    """Score at most this many tokens of each test set (0: all)."""
    reset_stream_every: int = 64
    """Every model's training gives each stream a fresh state every this many windows, staggered
    (about a novel's length at 8K-byte windows), so models also learn to start a book cold."""
    memory_read_dropout: float = 0.1
    """Share of streams whose memory read every model's training leaves out for a window, so a
    model also learns to predict with nothing read (a book's first bytes)."""
    recall_every: int = 0
    """Windows per recall episode in every model's training mix (generated facts and questions,
    :mod:`horizonlm.data.episodes`; 0: prose only). The same data for every model."""
    recall_rate: float = 1.0
    """Share of (stream, episode) pairs that carry facts and a question."""
    recall_keys: int = 4
    """Facts per episode: 1 to this many, each asked once."""
    recall_weight: float = 5.0
    """Loss weight of the answers' target bytes."""
    recall_same_window: float = 0.5
    """Share of episodes whose facts are in the question's window (the rest: an earlier window)."""
    recall_cloze: float = 0.0
    """Share of asked facts whose question ends with the fact's own words before its value
    (``TrainConfig.retrieval_cloze``)."""
    eval_batch: int = 16
    """Streams scored per call (books, reset windows, cold starts; each stream exactly as alone)."""
    curve_points: int = 4
    """Validations spread over each main run (on ``curve_tokens`` of the valid split, at most
    ``max_eval_tokens``), for the validation loss against training time (``valid_curve``); 0: none.
    Not counted in the training budget; each also saves a checkpoint (a few seconds on an H200),
    so they stay few: a main run of the protocol must fit one 10-minute device call."""
    curve_tokens: int = 262_144
    """Valid tokens each of those validations scores."""
    position_bins: int = 16
    """Log-spaced bins of position within a book for the by-position curve."""
    cold_starts: int = 64
    """Streams started cold (a fresh state: empty memory) at this many evenly spaced places of
    the test split, each scored for ``cold_length`` bytes: the by-position curve of a start with
    nothing remembered, averaged over many starts rather than the few books' first bytes."""
    cold_length: int = 2048
    """Bytes scored after each cold start."""
    score_memory_capacity: int = 0
    """Also score the test split with the state carried and the memory asked at this many chunks
    (``{corpus}_test_carried_memory_{N}``; 0: not): a model trained with a short memory, asked
    with a long one, as ``horizon passkey --memory-capacity`` asks it. Models without a memory skip it."""
    runs: str = "runs/quality"
    """Folder for each model's run."""
    out: str = "bench/results/quality.json"
    """Results file (PNG beside it)."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    workers: int = 1
    """Runs at once, each in its own process that sees one GPU (slot i: CUDA_VISIBLE_DEVICES=i);
    1 runs everything in this process. Each run still trains alone on its GPU, so budgets stay equal."""
    ablation_lr_from_horizon: bool = False
    """Ablations (horizon_no_*) train at the full model's swept learning rate instead of their own
    sweep: three fewer sweep runs each, at the price of a rate tuned for a different model."""
    replace: bool = False
    """Let this call replace the entries of its models already in the results file (otherwise a
    model that is already there is refused before any training)."""
    protocol: str = ""
    """A protocol of :data:`PROTOCOLS` (e.g. ``h200-8min``): its settings replace these, and the
    results record its name and settings ('': the settings as given)."""
    stage: str = "all"
    """``sweep``: only each model's learning-rate sweep, recorded in the results file (one device
    call); ``main``: the main run at the rate the recorded sweep chose, nothing retrained (another
    call); ``all``: both in this call."""
    seed: int = 0
    """Seed of the initialisation; an entry trained with seed s > 0 is named ``MODEL-seedS``."""
    kernel_warmup: int = 2
    """Untimed forward and backward passes before each run's clock starts (``TrainConfig.kernel_warmup``),
    so no model's budget pays for compiling and autotuning its kernels (the GLA peer's take minutes
    on a fresh machine; entries before 4 December 2026, session 19, paid their first step's 2-3 s)."""

    def __post_init__(self) -> None:
        if self.protocol:
            if self.protocol not in PROTOCOLS:
                raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)} (or empty), got {self.protocol!r}")
            for name, value in PROTOCOLS[self.protocol].items():
                setattr(self, name, value)
        if self.stage not in ("all", "sweep", "main"):
            raise ValueError(f"stage must be all, sweep or main, got {self.stage!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.eval_batch < 1:
            raise ValueError(f"eval_batch must be >= 1, got {self.eval_batch}")
        if self.curve_points < 0 or self.curve_tokens < 1:
            raise ValueError(f"curve_points must be >= 0 and curve_tokens >= 1, got {self.curve_points}, "
                             f"{self.curve_tokens}")
        if self.kernel_warmup < 0:
            raise ValueError(f"kernel_warmup must be >= 0, got {self.kernel_warmup}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.score_memory_capacity < 0:
            raise ValueError(f"score_memory_capacity must be >= 0, got {self.score_memory_capacity}")
        if self.minutes <= 0 or self.sweep_minutes <= 0:
            raise ValueError(f"minutes and sweep_minutes must be > 0, got {self.minutes}, {self.sweep_minutes}")


def _overrides(name: str, preset: str) -> dict[str, Any]:
    """The model fields an entry of ABLATIONS changes; the ungated block gets back the MLP width
    (d_model/3 wider) that the preset gave up for the gate, so parameters stay matched."""
    overrides = dict(ABLATIONS[name][1])
    base = HorizonConfig.preset(preset)
    if overrides.get("ssm_gate") == "none":
        overrides["mlp_hidden"] = base.mlp_hidden + base.d_model // 3
    if "memory_layer" in overrides:  # a small preset has fewer blocks: its last one at most
        overrides["memory_layer"] = min(overrides["memory_layer"], base.n_layers - 1)
    return overrides


def _train(cfg: QualityConfig, name: str, lr: float, minutes: float, out: Path,
           step_seconds: float | None = None, curve: bool = False) -> dict[str, Any]:
    """One training run; its cosine schedule spans the steps that fit the budget at ``step_seconds``
    per step (measured by a short probe run when not given). With ``curve``, validated
    ``curve_points`` times along the way on ``curve_tokens`` tokens (the last at the end)."""
    kind, overrides = ABLATIONS[name][0], _overrides(name, cfg.preset)
    steps = 10**9  # the budget ends each run; the schedule spans an estimate of the steps that fit
    tcfg = TrainConfig(data=cfg.data, out=str(out), model=kind, preset=cfg.preset, model_overrides=overrides,
                       batch_size=cfg.batch_size, seq_len=cfg.seq_len, steps=steps, max_minutes=minutes, lr=lr,
                       ssm_lr=min(lr, 1e-3), eval_every=0, eval_tokens=min(1_000_000, cfg.max_eval_tokens or 10**9),
                       eval_window=cfg.eval_window, save_every=0, save_streams=False, device=cfg.device,
                       progress=False, seed=cfg.seed, kernel_warmup=cfg.kernel_warmup,
                       budget_includes_validation=False,
                       reset_stream_every=cfg.reset_stream_every, memory_read_dropout=cfg.memory_read_dropout,
                       retrieval_every=cfg.recall_every,
                       retrieval_rate=cfg.recall_rate, retrieval_keys=cfg.recall_keys,
                       retrieval_weight=cfg.recall_weight, retrieval_same_window=cfg.recall_same_window,
                       retrieval_cloze=cfg.recall_cloze)
    tcfg.steps = _estimate_steps(tcfg) if step_seconds is None else max(10, int(minutes * 60 / step_seconds))
    if curve and cfg.curve_points:
        tcfg.eval_every = max(1, tcfg.steps // cfg.curve_points)
        tcfg.eval_tokens = min(cfg.curve_tokens, cfg.max_eval_tokens or cfg.curve_tokens)
    summary = train(tcfg)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return {"summary": summary, "log": [r for r in log if "loss" in r], "train_config": asdict(tcfg)}


STEP_MARGIN = 0.97
"""The step time a schedule is sized by, as a fraction of the measured mean: a little quick, so
the budget cuts the schedule a few steps before its end (at 97% of a cosine the rate is within
0.3% of its range above the floor) rather than the schedule ending before the budget, and every
model trains for the same time."""


def _step_seconds(times: list[float]) -> float:
    """Seconds per training step to size a schedule by, from the logged times of a run:
    :data:`STEP_MARGIN` times the mean step-to-step time after the first four steps (warm-up:
    CUDA and library initialisation, the allocator growing), without steps over twice the median
    (a validation, a transiently slow device). A mean, not a low quantile: a memory that fills
    over a stream's life makes steps slower as it fills, and a low quantile counts the quick steps
    of an empty memory only (the lower quartile sized horizon_long_memory's 8-minute schedule at
    1,065 steps of 0.45 s; it ran 1.0 s a step and was cut at step 504, the rate not annealed)."""
    deltas = np.diff(times[3:]) if len(times) > 5 else np.diff(times)  # (n,)
    if not len(deltas):
        return 1.0
    return STEP_MARGIN * float(deltas[deltas <= 2 * np.median(deltas)].mean())


def _fill_steps(tcfg: TrainConfig) -> int:
    """Training steps until a stream's memory holds all it can (capped by the stream's cold
    restarts): a timing probe runs at least this long, so it times full memories too."""
    model = tcfg.model_config(256)
    capacity, chunk = model.get("memory_capacity"), model.get("chunk_size")
    if not model.get("use_memory", False) or not capacity or not chunk:
        return 0
    steps = math.ceil(capacity * chunk / tcfg.seq_len)
    return min(steps, tcfg.reset_stream_every) if tcfg.reset_stream_every else steps


def _estimate_steps(tcfg: TrainConfig) -> int:
    """Time a few steps to size the cosine schedule to the budget (the timing run is discarded):
    16 steps, or one fill of the memory and 4 more where that is longer (see :func:`_step_seconds`).
    No warm-up passes: its first steps compile the kernels and are left out of the timing."""
    probe = TrainConfig(**{**asdict(tcfg), "out": tcfg.out + "-probe", "steps": max(16, _fill_steps(tcfg) + 4),
                           "max_minutes": 0, "eval_tokens": 2, "save_every": 0, "kernel_warmup": 0})
    train(probe)
    times = [r["time"] for r in map(json.loads, (Path(probe.out) / "log.jsonl").read_text().splitlines()) if "loss" in r]
    return max(10, int(tcfg.max_minutes * 60 / max(_step_seconds(times), 1e-6)))


def _score_books(model, tokens: np.ndarray, documents: list, window: int, device, reset_every: int | None,
                 bins: np.ndarray, batch: int) -> dict[str, Any]:
    """Each book as its own stream (with ``reset_every``, each stretch of that many bytes of it as
    its own stream), ``batch`` streams per call; totals and bits per byte by (absolute) position in
    the book."""
    return _binned(_book_losses(model, tokens, documents, window, device, reset_every, batch), bins)


def _book_losses(model, tokens: np.ndarray, documents: list, window: int, device, reset_every: int | None,
                 batch: int) -> list[np.ndarray]:
    """Each book's per-byte losses in nats (see :func:`_score_books`)."""
    pieces, owner = [], []  # the streams scored, and (book, offset) of each
    for book, (_, start, end) in enumerate(documents):
        step = reset_every or (end - start)
        for offset in range(0, end - start - 1, step):
            pieces.append(tokens[start + offset : min(end, start + offset + step + 1)])
            owner.append((book, offset))
    per_piece = evaluate_streams(model, pieces, window, device, batch=batch)
    per_book = [np.zeros(end - start - 1, dtype=np.float32) for _, start, end in documents]
    for (book, offset), nats in zip(owner, per_piece):
        per_book[book][offset : offset + len(nats)] = nats
    return per_book


def _bin_of(length: int, bins: np.ndarray) -> np.ndarray:
    """The position bin of each of a book's first ``length`` predicted bytes (position 1 first)."""
    return np.clip(np.searchsorted(bins, np.arange(1, length + 1), side="right") - 1, 0, len(bins) - 2)  # (length,)


def _binned(per_book: list[np.ndarray], bins: np.ndarray) -> dict[str, Any]:
    """Totals and bits per byte by position over the books' per-byte losses (nats)."""
    sums, counts = np.zeros(len(bins) - 1), np.zeros(len(bins) - 1)
    for per in per_book:
        which = _bin_of(len(per), bins)  # (len,)
        np.add.at(sums, which, per)
        np.add.at(counts, which, 1)
    total, count = float(sum(p.sum(dtype=np.float64) for p in per_book)), sum(len(p) for p in per_book)
    by_pos = [{"from": int(bins[i]), "to": int(bins[i + 1]), "bits_per_byte": float(sums[i] / counts[i] / math.log(2))}
              for i in range(len(bins) - 1) if counts[i]]
    return {"bits_per_byte": total / count / math.log(2), "tokens": count, "by_position": by_pos}


def _score_cold_starts(model, tokens: np.ndarray, starts: int, length: int, device, bins: np.ndarray,
                       batch: int) -> dict[str, Any]:
    """Bits per byte by position after a cold start, over ``starts`` evenly spaced starts: each
    start is scored as a book of ``length`` predicted bytes of its own.

    The starts are the same for every model scored on the same split, so two models can be
    compared start by start (:func:`horizonlm.bench.quality_summary.paired_bins`): ``by_start``
    holds each start's bits per byte in each bin, and each bin of ``by_position`` its standard
    error over the starts (``stderr``; a few bytes a start in the first bins make those noisy)."""
    documents = [[None, int(start), int(start) + length + 1]
                 for start in np.linspace(0, len(tokens) - length - 1, starts).astype(np.int64)]
    per_start = _book_losses(model, tokens, documents, length, device, None, batch)
    result = _binned(per_start, bins)
    which = _bin_of(length, bins)  # (length,): every start has the same length
    used = np.unique(which)  # the bins by_position reports, in order
    by_start = np.stack([[per[which == b].mean() / math.log(2) for b in used] for per in per_start])  # (starts, bins)
    spread = by_start.std(axis=0, ddof=1) / math.sqrt(len(per_start)) if len(per_start) > 1 else None  # (bins,)
    for i, row in enumerate(result["by_position"]):
        row["stderr"] = None if spread is None else float(spread[i])
    return {**result, "starts": starts, "by_start": np.round(by_start, 4).tolist()}


def evaluate_model(cfg: QualityConfig, checkpoint: Path, device: torch.device, reset_window: int) -> dict[str, Any]:
    model = load_checkpoint(checkpoint).model.to(device)
    meta = load_meta(cfg.data)
    test = open_split(cfg.data, "test")
    limit = cfg.max_eval_tokens or len(test)
    documents = [d for d in meta.get("documents", {}).get("test", [[None, 0, len(test)]]) if d[1] < limit]
    documents = [[name, start, min(end, limit)] for name, start, end in documents] or [[None, 0, min(len(test), limit)]]
    longest = max(end - start for _, start, end in documents)
    bins = np.unique(np.geomspace(1, max(2, longest + 1), cfg.position_bins + 1).astype(np.int64))
    corpus = meta.get("corpus") or Path(cfg.data).name  # the scores are named after the corpus they read
    batch = cfg.eval_batch
    scores: dict[str, Any] = {f"{corpus}_test_carried": _score_books(model, test, documents, cfg.eval_window, device,
                                                                     None, bins, batch)}
    if cfg.cold_starts:
        cold_bins = np.unique(np.geomspace(1, cfg.cold_length + 1, cfg.position_bins + 1).astype(np.int64))
        scores[f"{corpus}_test_cold_starts"] = _score_cold_starts(model, test[:limit], cfg.cold_starts,
                                                                  cfg.cold_length, device, cold_bins, batch)
    if carries_state(model):
        scores[f"{corpus}_test_reset_each_window"] = _score_books(model, test, documents, reset_window, device,
                                                                  reset_window, bins, batch)
    memory = getattr(model, "memory", None)
    if cfg.score_memory_capacity and memory is not None:
        trained, memory.capacity = memory.capacity, cfg.score_memory_capacity
        try:
            scores[f"{corpus}_test_carried_memory_{cfg.score_memory_capacity}"] = {
                **_score_books(model, test, documents, cfg.eval_window, device, None, bins, batch),
                "memory_capacity": cfg.score_memory_capacity, "trained_memory_capacity": trained}
        finally:
            memory.capacity = trained
    raw = Path(cfg.wikitext_raw).read_bytes()[:limit] if cfg.wikitext_raw and Path(cfg.wikitext_raw).is_file() else b""
    text = (Path(cfg.wikitext_tokens).read_bytes()[:limit]
            if cfg.wikitext_tokens and Path(cfg.wikitext_tokens).is_file() else b"")
    wiki = [np.frombuffer(t, dtype=np.uint8) for t in (raw, text) if len(t) > 1]
    wiki_nats = iter(evaluate_streams(model, wiki, cfg.eval_window, device, batch=batch))  # the two files at once
    if len(raw) > 1:
        nats = next(wiki_nats)
        scores["wikitext_raw_test"] = {"bits_per_byte": float(nats.sum(dtype=np.float64) / len(nats) / math.log(2)),
                                       "tokens": len(nats)}
    if len(text) > 1:
        nats = next(wiki_nats)
        words = wikitext_word_count(text.decode("utf-8", errors="replace"))
        scores["wikitext103_test_word_ppl_out_of_domain"] = {
            "word_perplexity": word_perplexity(float(nats.sum(dtype=np.float64)), words), "words": words,
            "bytes": len(nats) + 1,
            "note": "byte model trained on novels only; total byte loss over the .tokens text divided by its words + <eos>"}
    return scores


def _run_task(cfg: QualityConfig, name: str, lr: float, final: bool,
              step_seconds: float | None = None) -> dict[str, Any]:
    """One sweep candidate (scored on the valid split; its time per step recorded, so the main
    run needs no probe) or one final run (trained, then scored)."""
    if not final:
        run = _train(cfg, name, lr, cfg.sweep_minutes, Path(cfg.runs) / f"{name}-lr{lr:g}")
        valid = run["summary"]["valid"][-1]["valid_bits_per_byte"] if run["summary"]["valid"] else float("inf")
        return {"lr": lr, "valid_bits_per_byte": valid, "seconds_per_step": _step_seconds([r["time"] for r in run["log"]])}
    run = _train(cfg, name, lr, cfg.minutes, Path(cfg.runs) / entry_name(name, cfg.seed), step_seconds, curve=True)
    summary = run["summary"]
    seconds_at = {r["step"]: r["time"] for r in run["log"]}  # training seconds when each step ended
    device = resolve_device(cfg.device)
    checkpoints = Path(cfg.runs) / entry_name(name, cfg.seed) / "checkpoints"
    trained = load_checkpoint(checkpoints)  # what the run left: its config and the read's learned scalars
    memory = getattr(trained.model, "memory", None)
    return {"lr": lr, "parameters": summary["parameters"], "tokens_seen": summary["tokens_seen"],
            # what the name meant when this ran (a default can change between calls of one file)
            "model_overrides": run["train_config"]["model_overrides"],
            "model_config": trained.info["config"],
            "memory_read": memory.read_scalars() if memory is not None else None,  # the trained tau growth a, s_0
            "train_seconds": summary["train_seconds"], "train_loss": summary["train_loss"], "steps": summary["step"],
            "first_step_seconds_incl_warmup": run["log"][0]["time"] if run["log"] else None,
            "loss_curve": [[r["time"], r["loss"]] for r in run["log"]],
            "valid_curve": [[seconds_at.get(v["step"], 0.0), v["valid_bits_per_byte"]] for v in summary["valid"]],
            "scores": evaluate_model(cfg, checkpoints, device, cfg.seq_len),
            "seed": cfg.seed, "environment": environment()}


def entry_name(name: str, seed: int) -> str:
    """A model's entry in the results file: its name, with the seed when it is not 0."""
    return name if seed == 0 else f"{name}-seed{seed}"


def data_record(data: str) -> dict[str, Any]:
    """What the results say about the training data: the folder, the corpus named in its
    meta.json and each split's size and sha256, so no number is read as another corpus's."""
    meta = load_meta(data)
    splits = {k: {"tokens": v.get("tokens"), "sha256": v.get("sha256")} for k, v in meta["splits"].items()}
    return {"path": data, "corpus": meta.get("corpus"), "tokenizer": meta["tokenizer"].get("kind"), "splits": splits}


def _task_in_child(slot: int, cfg: dict[str, Any], name: str, lr: float, final: bool, step_seconds: float | None,
                   result: str) -> None:
    """Entry point of a worker process: sees one GPU only, writes its result as JSON."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(slot)  # before the first CUDA call of this process
    atomic_write_json(Path(result), _run_task(QualityConfig(**cfg), name, lr, final, step_seconds))


class _Workers:
    """Runs tasks one per GPU slot, each in a fresh process (``workers`` > 1), or in this process."""

    def __init__(self, cfg: QualityConfig) -> None:
        self.cfg = cfg
        self.pool = ThreadPoolExecutor(max_workers=cfg.workers) if cfg.workers > 1 else None
        self.slots: queue.Queue[int] = queue.Queue()
        for slot in range(cfg.workers):
            self.slots.put(slot)

    def submit(self, name: str, lr: float, final: bool, step_seconds: float | None = None) -> Future:
        if self.pool is None:
            done: Future = Future()
            done.set_result(_run_task(self.cfg, name, lr, final, step_seconds))
            return done
        return self.pool.submit(self._in_process, name, lr, final, step_seconds)

    def _in_process(self, name: str, lr: float, final: bool, step_seconds: float | None) -> dict[str, Any]:
        slot = self.slots.get()
        try:
            result = Path(self.cfg.runs) / f"{name}-lr{lr:g}-{'final' if final else 'sweep'}.json"
            process = mp.get_context("spawn").Process(target=_task_in_child,
                                                      args=(slot, asdict(self.cfg), name, lr, final, step_seconds,
                                                            str(result)))
            process.start()
            process.join()
            if process.exitcode != 0:
                raise HorizonError(f"quality run {name} (lr {lr:g}, {'final' if final else 'sweep'}) failed "
                                   f"with exit code {process.exitcode}; its log is under {self.cfg.runs}")
            return json.loads(result.read_text())
        finally:
            self.slots.put(slot)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _chosen_lr(name: str, borrow: list[str], sweeps: dict[str, list[Future]], results: dict[str, Any],
               lrs: list[float]) -> float | None:
    """The rate ``name`` trains at: the best of its sweep in this call, or of the one recorded in
    the results file; None while the sweep that decides it is still running."""
    source = "horizon" if name in borrow else name
    if source in sweeps:
        if not all(f.done() for f in sweeps[source]):
            return None
        return min((f.result() for f in sweeps[source]), key=lambda r: r["valid_bits_per_byte"])["lr"]
    if source in results["sweeps"]:
        return min(results["sweeps"][source], key=lambda r: r["valid_bits_per_byte"])["lr"]
    if name in borrow and "horizon" in results["models"]:  # the full model was swept by an earlier call
        return results["models"]["horizon"]["lr"]
    return lrs[0]


def _swept_step_seconds(name: str, lr: float, sweeps: dict[str, list[Future]], results: dict[str, Any]
                        ) -> float | None:
    """Seconds per step of ``name``'s own sweep run at ``lr`` (this call's or the recorded one), which
    sizes the main run's schedule without a probe; None when there is none (a borrowed rate)."""
    runs = [f.result() for f in sweeps[name]] if name in sweeps else results["sweeps"].get(name, [])
    return next((r.get("seconds_per_step") for r in runs if r["lr"] == lr), None)


def run_quality(cfg: QualityConfig) -> dict[str, Any]:
    """Sweeps, then main runs as soon as each model's learning rate is known, spread over
    ``workers`` GPUs; or one stage (``stage``): the sweeps alone, recorded in the results file, or
    the main runs at the rates recorded there. Entries already in ``out`` are kept (a later call
    adds the rest)."""
    out = Path(cfg.out)
    names = cfg.models.split(",")
    for name in names:
        if name not in ABLATIONS:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(ABLATIONS)}")
        kind = ABLATIONS[name][0]
        with torch.device("meta"):  # a model this machine cannot build (a peer without its library) fails now
            build_model(kind, MODEL_KINDS[kind][1].preset(cfg.preset, **_overrides(name, cfg.preset)).to_dict())
    results: dict[str, Any] = {"environment": environment(), "config": asdict(cfg), "models": {}, "sweeps": {}}
    if cfg.protocol:
        results["protocol"] = {"name": cfg.protocol, "settings": PROTOCOLS[cfg.protocol]}
    if out.is_file():
        earlier = json.loads(out.read_text())
        if earlier.get("protocol", {}).get("name") != results.get("protocol", {}).get("name"):
            raise HorizonError(f"{out} holds results of protocol {earlier.get('protocol', {}).get('name') or 'none'!r}, "
                               f"this call is {cfg.protocol or 'none'!r}: give another --out")
        results["models"], results["sweeps"] = earlier.get("models", {}), earlier.get("sweeps", {})
        for key, value in earlier.items():  # what this call does not remake (the summary, renaming records) stays
            results.setdefault(key, value)
        made = results["sweeps"] if cfg.stage == "sweep" else results["models"]
        again = sorted(set(made) & {entry_name(n, cfg.seed) if cfg.stage != "sweep" else n for n in names})
        if again and not cfg.replace:
            raise HorizonError(f"{out} already holds {'sweeps of ' if cfg.stage == 'sweep' else ''}{', '.join(again)}; "
                               "pass --replace to measure them again, or --out for another results file")
    lrs = [float(x) for x in cfg.lrs.split(",")]
    borrow = [n for n in names if cfg.ablation_lr_from_horizon and n.startswith("horizon_no_")]
    if borrow and "horizon" not in names and "horizon" not in results["models"]:
        raise ValueError("ablation_lr_from_horizon needs 'horizon' among the models or already in the results file")
    if cfg.stage == "main":
        missing = [n for n in names if len(lrs) > 1 and ("horizon" if n in borrow else n) not in results["sweeps"]]
        if missing:
            raise HorizonError(f"{out} holds no sweep of {', '.join(missing)}: run --stage sweep first")
    swept = [n for n in names if len(lrs) > 1 and n not in borrow and cfg.stage != "main"]
    results["data"] = data_record(cfg.data)  # after the checks of the settings: a missing folder is refused here
    workers = _Workers(cfg)
    try:
        sweeps = {name: [workers.submit(name, lr, final=False) for lr in lrs] for name in swept}
        if cfg.stage == "sweep":
            for name in swept:
                results["sweeps"][name] = [f.result() for f in sweeps[name]]
                atomic_write_json(out, results)
            return results
        finals: dict[str, Future] = {}
        while len(finals) < len(names):
            for name in names:
                lr = _chosen_lr(name, borrow, sweeps, results, lrs)
                if name not in finals and lr is not None:
                    finals[name] = workers.submit(name, lr, final=True,
                                                  step_seconds=_swept_step_seconds(name, lr, sweeps, results))
            pending = [f for runs in sweeps.values() for f in runs if not f.done()]
            if len(finals) < len(names) and pending:
                wait(pending, return_when=FIRST_COMPLETED)
        for name in names:
            entry = finals[name].result()
            if name in sweeps:
                results["sweeps"][name] = [f.result() for f in sweeps[name]]
            entry["sweep"] = [] if name in borrow else results["sweeps"].get(name, [])
            entry["lr_from"] = ("horizon's sweep" if name in borrow else "own sweep" if entry["sweep"] else "given")
            # The settings this entry was made with: a results file gathers entries of several calls,
            # and the file's "config" is only the last call's.
            entry["settings"] = {k: v for k, v in asdict(cfg).items() if k not in ("models", "replace", "stage")}
            results["models"][entry_name(name, cfg.seed)] = entry
            results["summary"] = summarize_quality(results)
            print(json.dumps({"model": entry_name(name, cfg.seed), "lr": entry["lr"],
                              **{k: score_value(v) for k, v in entry["scores"].items()}}),
                  flush=True)
            atomic_write_json(out, results)
    finally:
        workers.close()
    plot_quality(results, out.with_suffix(".png"))
    if results.get("summary"):
        print(format_quality_table(results["summary"]), flush=True)
    return results


def _moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each run of ``window`` values (the last ``len - window + 1``): a noisy loss made readable."""
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")  # (n - window + 1,)


def plot_quality(results: dict[str, Any], path: Path, top_bits: float = 3.0, mean_steps: int = 25) -> None:
    """Three panels: loss against time, the test split by position, cold starts; one legend for all.

    Losses above ``top_bits`` are clipped in the first two panels: the first bytes of a book and the
    first steps of training cost several bits, the differences between models a few hundredths. A
    training loss is drawn as the mean of each ``mean_steps`` steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(20, 5))
    colors = plt.get_cmap("tab20" if len(results["models"]) > 10 else "tab10").colors
    for i, (name, entry) in enumerate(results["models"].items()):
        color = colors[i % len(colors)]  # one colour per model in every panel; carried solid, reset dotted
        valid = np.array(entry.get("valid_curve") or [])  # (n, 2): training seconds, valid bits/byte
        curve = np.array(entry["loss_curve"])  # (n, 2): training seconds, train nats
        if len(valid) > 1:
            axes[0].plot(valid[:, 0], valid[:, 1], "o-", color=color, label=name)
        elif len(curve):  # no validation curve (the protocol's main runs): training loss, a moving mean
            bits = _moving_mean(curve[:, 1], mean_steps) / math.log(2)  # (n - w + 1,)
            seconds = curve[len(curve) - len(bits):, 0]  # (n - w + 1,): each mean drawn at its window's last step
            axes[0].plot(seconds, bits, color=color, lw=1.0, label=name)
        for suffix, style in (("_test_carried", "-"), ("_test_reset_each_window", ":")):
            pos = next((v for k, v in entry["scores"].items() if k.endswith(suffix)), {}).get("by_position", [])
            if pos:
                axes[1].plot([(p["from"] + p["to"]) / 2 for p in pos], [p["bits_per_byte"] for p in pos], style,
                             color=color)
        cold = next((v for k, v in entry["scores"].items() if k.endswith("_test_cold_starts")), {}).get("by_position", [])
        if cold:
            mid, bits = [(p["from"] + p["to"]) / 2 for p in cold], [p["bits_per_byte"] for p in cold]
            axes[2].plot(mid, bits, color=color)
            if all(p.get("stderr") is not None for p in cold):  # +- one standard error over the starts
                err = np.array([p["stderr"] for p in cold])  # (bins,)
                axes[2].fill_between(mid, np.array(bits) - err, np.array(bits) + err, color=color, alpha=0.2, lw=0)
    axes[0].set(xlabel="seconds since training started", ylabel="bits per byte", ylim=(None, top_bits),
                title=f"loss against time (valid where recorded, else train, mean of {mean_steps} steps; "
                      f"top clipped at {top_bits:g})")
    axes[1].set(xlabel="position in the book (bytes)", ylabel="bits per byte", xscale="log", ylim=(None, top_bits),
                title=f"{results.get('data', {}).get('corpus') or 'novels'} test by position, carried solid, reset "
                      f"dotted (top clipped at {top_bits:g})")
    axes[2].set(xlabel="bytes after a cold start (empty state and memory)", ylabel="bits per byte",
                title="test split, cold starts (mean over starts, band +-1 s.e.)", xscale="log", ylim=(None, 6))
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.title.set_fontsize(9)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # one legend for the three panels, beside them: colours name the models everywhere
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.86, 0.5), fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.86 if handles else 1, 1))
    save_figure(fig, path)
