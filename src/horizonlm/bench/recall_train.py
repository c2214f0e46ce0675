"""Training and scoring of one model on recall batches (``horizon bench recall``).

A batch is fed window by window with the model's state carried (``forward(x, state)``) and
detached between windows, as ``horizon train`` does. Windows without a query run without an
autograd graph; a window with queries back-propagates its share of the loss at once, so the
gradient of a long sequence never spans more than one window. The loss is the cross-entropy of
the answers only. The optimiser is ``horizon train``'s AdamW with its parameter groups and its
warm-up + cosine schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from horizonlm.bench.recall_data import RecallBatch
from horizonlm.bench.recall_probe import MemoryProbe
from horizonlm.errors import HorizonError
from horizonlm.train import OptimizerSettings, lr_factor, make_optimizer

PROBE_STEPS = 10
"""Steps timed before a time budget fixes the length of the cosine schedule."""


@dataclass(frozen=True)
class Budget:
    """When a training run stops: after ``steps`` or ``minutes``, whichever comes first (0: no limit)."""

    steps: int
    """Optimizer steps (0: no step limit)."""
    minutes: float
    """Wall-clock minutes of training steps (0: no time limit)."""


def _autocast(device: torch.device, bf16: bool):
    """bf16 on CUDA as ``horizon train`` does; CPU runs in float32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and bf16)


def feed(model: nn.Module, batch: RecallBatch, window: int, backward: bool, bf16: bool) -> tuple[Tensor, Tensor]:
    """One batch through the model in windows of ``window`` tokens, state carried. Returns the
    summed answer loss in nats (detached) and the argmax prediction of every query (B, P).
    With ``backward``, each window's share of the mean answer loss is back-propagated."""
    tokens = batch.tokens
    device = tokens.device
    count = batch.answers.numel()
    first, last = int(batch.query_pos.min()), int(batch.query_pos.max())
    predictions = torch.full_like(batch.answers, -1)  # (B, P)
    total = torch.zeros((), device=device)  # ()
    state = None
    for start in range(0, tokens.shape[1], window):
        x = tokens[:, start : start + window]  # (B, Lw)
        asked = start <= last and first < start + x.shape[1]
        with torch.set_grad_enabled(backward and asked), _autocast(device, bf16):
            logits, state = model(x, state)  # (B, Lw, V)
        state = state.detach()
        if not asked:
            continue
        local = batch.query_pos - start  # (B, P)
        inside = (local >= 0) & (local < x.shape[1])  # (B, P)
        at = local.clamp(0, x.shape[1] - 1).unsqueeze(-1).expand(-1, -1, logits.shape[-1])  # (B, P, V)
        picked = logits.gather(1, at).float()  # (B, P, V)
        nats = F.cross_entropy(picked.flatten(0, 1), batch.answers.flatten(), reduction="none")  # (B*P,)
        loss = (nats.view_as(inside) * inside).sum()  # ()
        if backward:
            (loss / count).backward()
        total = total + loss.detach()
        predictions = torch.where(inside, picked.detach().argmax(-1), predictions)  # (B, P)
    return total, predictions


def train_model(model: nn.Module, sample: Callable[[int], RecallBatch], window: Callable[[RecallBatch], int],
                optim: OptimizerSettings, lr: float, budget: Budget, bf16: bool, log_every: int) -> dict[str, Any]:
    """Train on ``sample(step)`` until the budget ends. With a time budget the cosine schedule
    spans the steps that fit, estimated from the first :data:`PROBE_STEPS` (the first of them,
    with its one-time start-up cost, left out)."""
    device = next(model.parameters()).device
    opt = make_optimizer(model, optim, lr, fused=device.type == "cuda")
    model.train()
    total = budget.steps or 10**9
    limit = budget.minutes * 60 if budget.minutes else math.inf
    curve: list[list[float]] = []
    seconds, step, since_first = 0.0, 0, 0.0
    while step < total and seconds < limit:
        t0 = time.perf_counter()
        factor = lr_factor(step, total, optim.warmup, optim.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        batch = sample(step)
        loss, predictions = feed(model, batch, window(batch), backward=True, bf16=bf16)
        if optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step in (1, PROBE_STEPS) or step % log_every == 0 or step == total:
            value = loss.item() / batch.answers.numel()  # waits for the device: timing is exact here
            accuracy = (predictions == batch.answers).float().mean().item()
            curve.append([step, seconds + time.perf_counter() - t0, value, accuracy])
            if not math.isfinite(value):
                raise HorizonError(f"the answer loss became {value} at step {step} (lr {lr:g})")
        seconds += time.perf_counter() - t0
        if step == 1:
            since_first = seconds
        if step == PROBE_STEPS and budget.minutes:
            per_step = (seconds - since_first) / (PROBE_STEPS - 1)
            fit = step + int((limit - seconds) / max(per_step, 1e-9))
            total = min(total, max(fit, step + 1))
    return {"steps": step, "train_seconds": seconds, "schedule_steps": total, "loss_curve": curve,
            "final_train_loss": curve[-1][2] if curve else None}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[RecallBatch], window: Callable[[RecallBatch], int],
             bf16: bool) -> dict[str, Any]:
    """Accuracy and answer loss over the batches; for a model with a memory, the retrieval hit
    rate beside them, and accuracy split by whether the read found the answer's chunk."""
    model.eval()
    memory = getattr(model, "memory", None)
    sums: dict[str, Tensor] = {}
    queries, t0 = 0, time.perf_counter()
    for batch in batches:
        probe = MemoryProbe(memory, batch.query_pos) if memory is not None else nullcontext()
        with probe:
            loss, predictions = feed(model, batch, window(batch), backward=False, bf16=bf16)
        right = predictions == batch.answers  # (B, P)
        parts = {"loss": loss, "right": right.sum()}
        if memory is not None:
            seen = probe.outcome(batch.answer_pos)
            hit, applicable = seen["hit"] & seen["applicable"], seen["applicable"]
            parts.update(applicable=applicable.sum(), hit=hit.sum(), evicted=seen["evicted"].sum(),
                         hit_entry=(seen["hit_entry"] & applicable).sum(),
                         chance=(seen["chance"] * applicable).sum(), right_hit=(right & hit).sum(),
                         right_miss=(right & applicable & ~hit).sum())
        for name, value in parts.items():
            sums[name] = sums.get(name, 0) + value.double()
        queries += batch.answers.numel()
    model.train()
    totals = {k: float(v) for k, v in sums.items()}
    result: dict[str, Any] = {"accuracy": totals["right"] / queries, "loss": totals["loss"] / queries,
                              "queries": queries, "seconds": time.perf_counter() - t0}
    result.update(_hit_summary(totals, queries, memory.entries_per_chunk > 1) if memory is not None
                  else {"hit_rate": None})
    return result


def _hit_summary(totals: dict[str, float], queries: int, entry_level: bool) -> dict[str, Any]:
    """Rates over the queries whose answer's chunk had completed before them (the others cannot
    be in the memory yet); an evicted entry counts as a miss. ``entry_level`` (one entry per
    token): also how often the read took the answer token's own entry, not just its chunk."""
    applicable = totals["applicable"]
    hits = totals["hit"]
    misses = applicable - hits

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    return {"hit_rate": ratio(hits, applicable), "hit_chance": ratio(totals["chance"], applicable),
            "entry_hit_rate": ratio(totals["hit_entry"], applicable) if entry_level else None,
            "hit_applicable_fraction": applicable / queries, "evicted_fraction": ratio(totals["evicted"], applicable),
            "accuracy_when_hit": ratio(totals["right_hit"], hits),
            "accuracy_when_miss": ratio(totals["right_miss"], misses)}
