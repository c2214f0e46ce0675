"""``horizon train``: long-stream training with truncated backprop through time.

``B`` contiguous streams advance one window of ``L`` tokens per step; HorizonLM carries its state
(detached) from one window to the next, so it learns to use context beyond the window. The
transformer baseline starts every window afresh (its cache would grow without bound).
Runs under ``torchrun`` with DDP: ranks take disjoint streams of one global batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from horizonlm.checkpoint import build_model, load_checkpoint, save_checkpoint
from horizonlm.config import HorizonConfig, TransformerConfig
from horizonlm.data.needles import DOORS
from horizonlm.data.stream import LongStreamBatcher, RetrievalMix, load_meta, open_split
from horizonlm.data.tokenizers import require_byte_level
from horizonlm.devices import resolve_device
from horizonlm.errors import HorizonError
from horizonlm.evaluate import evaluate_tokens
from horizonlm.fileio import atomic_write_bytes
from horizonlm.layers.ssm import SSM_PARAM_TAG
from horizonlm.model import HorizonLM
from horizonlm.state_io import state_from_tensors, state_to_tensors


@dataclass
class TrainConfig:
    """Everything ``horizon train`` reads; each field is also a command-line flag."""

    data: str = "runs/data/shakespeare"
    """Folder made by ``horizon prepare`` (meta.json + train/valid .bin)."""
    out: str = "runs/shakespeare"
    """Run folder: checkpoints/, log.jsonl, config.json."""
    model: str = "horizon"
    """``horizon`` or ``transformer`` (the baseline, same loop)."""
    preset: str = "cpu"
    """Model preset (tiny, cpu, small, base); the transformer takes the matching width and depth."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """Model config fields that replace the preset's (YAML ``model_overrides:`` mapping)."""
    batch_size: int = 16
    """B: streams per step, summed over all DDP ranks."""
    seq_len: int = 256
    """L: tokens per window."""
    steps: int = 500
    """Optimizer steps; with ``max_minutes`` whichever ends first."""
    max_minutes: float = 4.5
    """Stop after this much training time (0: no limit). The cosine schedule still spans ``steps``."""
    retrieval_every: int = 0
    """Mix in passkey episodes of this many windows (question at the end of the last);
    0: plain language modelling. Needs a byte-level tokenizer."""
    retrieval_rate: float = 0.5
    """Fraction of (stream, episode) pairs that carry a passkey episode."""
    retrieval_weight: float = 1.0
    """Loss weight of the answer's target tokens (the rest weigh 1)."""
    retrieval_same_window: float = 0.0
    """Fraction of episodes whose keys are stated in the question's window (the rest: in an
    earlier window). Writing the memory learns only from these: carried entries are detached."""
    retrieval_keys: int = 1
    """Episodes hide 1 to this many labelled keys (one unlabelled key when 1)."""
    reset_every: int = 0
    """Start from a fresh state every this many windows (0: only when the streams start over).
    Passkey training sets it to ``retrieval_every``: each episode then starts with an empty
    memory, and the training context is ``reset_every * seq_len`` tokens."""
    stop_after: int = 0
    """Stop this invocation after this many steps (0: run to ``steps``); resume later with ``--resume``.
    The schedule still spans ``steps``, so a run split into jobs equals one uninterrupted run."""
    lr: float = 6e-3
    """Peak learning rate of the weights."""
    ssm_lr: float = 1e-3
    """Learning rate of the S4D parameters (A, dt, C, D), which take no weight decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine decay)."""
    warmup: int = 30
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay of matrices (biases, norms and S4D parameters take none)."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    eval_every: int = 250
    """Validate every this many steps (0: only at the end)."""
    eval_tokens: int = 0
    """Validate on at most this many tokens of the valid split (0: all of it)."""
    eval_window: int = 2048
    """Window length when streaming an evaluation split."""
    save_every: int = 250
    """Checkpoint every this many steps (and always at the end)."""
    seed: int = 0
    """Seed of the initialisation (data order is fixed by the step)."""
    device: str = "auto"
    """``auto`` (CUDA if present), ``cpu`` or ``cuda``."""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    compile: bool = False
    """``torch.compile`` the model."""
    resume: bool = False
    """Continue from ``out/checkpoints/latest``: same data order, optimizer and carried state."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        if self.model not in ("horizon", "transformer"):
            raise ValueError(f"model must be 'horizon' or 'transformer', got {self.model!r}")
        for name in ("batch_size", "seq_len", "steps", "eval_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "eval_tokens", "save_every", "stop_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.ssm_lr <= 0:
            raise ValueError(f"lr and ssm_lr must be positive, got {self.lr}, {self.ssm_lr}")
        if self.retrieval_every < 0 or not 0 <= self.retrieval_rate <= 1 or self.retrieval_weight <= 0:
            raise ValueError("retrieval_every must be >= 0, retrieval_rate in [0, 1], retrieval_weight > 0")
        if not 0 <= self.retrieval_same_window <= 1 or not 1 <= self.retrieval_keys <= len(DOORS):
            raise ValueError(f"retrieval_same_window must be in [0, 1] and retrieval_keys in [1, {len(DOORS)}], "
                             f"got {self.retrieval_same_window}, {self.retrieval_keys}")
        if self.reset_every < 0:
            raise ValueError(f"reset_every must be >= 0, got {self.reset_every}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    def model_config(self, vocab_size: int) -> dict[str, Any]:
        overrides = {**self.model_overrides, "vocab_size": vocab_size}
        try:
            if self.model == "horizon":
                return HorizonConfig.preset(self.preset, **overrides).to_dict()
            return TransformerConfig.preset(self.preset, **overrides).to_dict()
        except (ValueError, TypeError) as err:
            raise HorizonError(f"invalid model settings: {err}") from err


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with three groups: decayed matrices, undecayed vectors, S4D parameters (own lr)."""
    decay, no_decay, ssm = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if getattr(p, SSM_PARAM_TAG, False):
            ssm.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": 0.0},
        {"params": ssm, "lr": cfg.ssm_lr, "base_lr": cfg.ssm_lr, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, cfg.beta2), fused=fused)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, slots in sd["state"].items():
        for key, value in slots.items():
            tensors[f"opt.{idx}.{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], header: dict[str, Any]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    try:
        opt.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    except (ValueError, KeyError) as err:
        raise HorizonError(f"optimizer state in the checkpoint does not fit this model: {err}") from err


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> Distributed:
    """Join the process group when started by torchrun (NCCL on GPU, gloo on CPU)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Distributed(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def weighted_loss(logits: Tensor, targets: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The plain mean loss (as :func:`lm_loss`) and the objective with per-target weights,
    normalised by the token count (not the weights), from one cross-entropy pass."""
    per_token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return per_token.mean(), (per_token * weight.reshape(-1)).mean()


def answer_digit_accuracy(logits: Tensor, targets: Tensor, weight: Tensor) -> Tensor | None:
    """Argmax accuracy on the digits of the up-weighted (answer) targets, or None when the batch
    has none: whether retrieval is being learned, visible in the training log."""
    digits = (weight != 1) & (targets >= ord("0")) & (targets <= ord("9"))  # (B, L)
    if not bool(digits.any()):
        return None
    return (logits.detach().argmax(-1) == targets)[digits].float().mean()


class _Log:
    """Append-only JSONL log; on resume, entries after the resumed step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            atomic_write_bytes(path, b"")
        elif path.is_file():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; returns a summary (final step, losses, validation bits per byte)."""
    dd = setup_distributed(resolve_device(cfg.device).type)
    try:
        return _train(cfg, dd)
    finally:
        if dd.world > 1:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, dd: Distributed) -> dict[str, Any]:
    device = resolve_device(cfg.device, dd.local_rank)
    if cfg.batch_size % dd.world != 0:
        raise HorizonError(f"batch_size={cfg.batch_size} must divide evenly over {dd.world} processes")
    meta = load_meta(cfg.data)
    train_tokens = open_split(cfg.data, "train")
    valid_tokens = open_split(cfg.data, "valid") if "valid" in meta["splits"] else None
    model_config = cfg.model_config(meta["vocab_size"])
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    local_batch = cfg.batch_size // dd.world
    if cfg.retrieval_every:
        require_byte_level(meta["tokenizer"], f"passkey episodes (retrieval_every) write bytes into {cfg.data}")
    mix = (RetrievalMix(cfg.retrieval_every, cfg.retrieval_rate, cfg.seed, cfg.retrieval_weight,
                        cfg.retrieval_same_window, cfg.retrieval_keys) if cfg.retrieval_every else None)
    batcher = LongStreamBatcher(train_tokens, cfg.batch_size, cfg.seq_len, first_stream=dd.rank * local_batch,
                                local_batch=local_batch, retrieval=mix)

    torch.manual_seed(cfg.seed)
    start_step, carried, tokens_seen = 0, None, 0
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_dir, expect_kind=cfg.model, expect_config=model_config, with_train_state=True)
        model = ckpt.model
        start_step = int(ckpt.info["step"])
        tokens_seen = int(ckpt.info.get("tokens_seen", 0))
    else:
        model = build_model(cfg.model, model_config)
    model.to(device)
    carry_state = isinstance(model, HorizonLM)
    opt = make_optimizer(model, cfg, fused=device.type == "cuda")
    if cfg.resume:
        tensors = {k: v.to(device) for k, v in ckpt.train_tensors.items()}
        _load_optimizer(opt, tensors, ckpt.info["optimizer"])
        torch.set_rng_state(ckpt.train_tensors["rng.cpu"])
        states = ckpt.info.get("carried_states")
        if carry_state and states is not None:
            header = states[dd.rank] if dd.rank < len(states) else None
            if header is None or ckpt.info.get("world", 1) != dd.world:
                raise HorizonError("resume needs the same number of processes as the run that saved the checkpoint")
            if header.get("kind") is not None:
                carried = state_from_tensors(tensors, header, prefix=f"state{dd.rank}.")
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2).encode())

    net: nn.Module = model
    if cfg.compile:
        net = torch.compile(net)
    if dd.world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.bf16)
    log = _Log(out / "log.jsonl", start_step if cfg.resume else None, dd.main)
    bits = 1 / math.log(2)
    bytes_per_token = meta["splits"]["train"]["bytes"] / meta["splits"]["train"]["tokens"]

    def checkpoint(step: int) -> Path | None:
        opt_tensors, opt_header = _optimizer_tensors(opt)
        state_tensors, headers = {}, []
        gathered = _gather_states(carried if carry_state else None, dd)
        for rank, (tensors_r, header_r) in enumerate(gathered):
            state_tensors.update({f"state{rank}.{k[len('state.'):]}": v for k, v in tensors_r.items()})
            headers.append(header_r)
        if not dd.main:
            return None
        info = {"tokenizer": meta["tokenizer"], "tokens_seen": tokens_seen, "optimizer": opt_header,
                "carried_states": headers, "world": dd.world, "train_config": dataclasses.asdict(cfg),
                "data_meta_sha": {k: v.get("sha256") for k, v in meta["splits"].items()}}
        train_tensors = {**opt_tensors, **state_tensors, "rng.cpu": torch.get_rng_state()}
        return save_checkpoint(ckpt_dir, step, model, info, train_tensors)

    summary: dict[str, Any] = {"start_step": start_step, "valid": []}
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (cfg.progress and dd.main), unit="step",
               dynamic_ncols=True)
    t_start = time.perf_counter()
    train_seconds = 0.0
    step = start_step
    loss_value = float("nan")
    end = min(cfg.steps, start_step + cfg.stop_after) if cfg.stop_after else cfg.steps
    while step < end:
        if cfg.max_minutes and train_seconds >= cfg.max_minutes * 60:
            break
        t0 = time.perf_counter()
        if batcher.starts_epoch(step) or (cfg.reset_every and step % cfg.reset_every == 0):
            carried = None
        x, y, weight = batcher.batch(step)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        factor = lr_factor(step, cfg.steps, cfg.warmup, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        with autocast:
            logits, new_state = net(x, carried if carry_state else None)
        answer_acc = None
        if weight is None:
            loss = objective = lm_loss(logits, y)
        else:
            weight = weight.to(device)
            loss, objective = weighted_loss(logits, y, weight)
            answer_acc = answer_digit_accuracy(logits, y, weight)
        objective.backward()
        loss_sum = loss.detach().clone()
        if dd.world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= dd.world
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            last = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else "none"
            raise HorizonError(f"loss became {loss_value} at step {step}; stopped without saving "
                               f"(last good checkpoint: {last})")
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        carried = new_state.detach() if carry_state else None
        step += 1
        tokens_seen += cfg.batch_size * cfg.seq_len
        dt = time.perf_counter() - t0
        train_seconds += dt
        record = {"step": step, "loss": loss_value, "bits_per_byte": loss_value * bits / bytes_per_token,
                  "lr": cfg.lr * factor, "tokens": tokens_seen, "tokens_per_s": cfg.batch_size * cfg.seq_len / dt,
                  "time": time.perf_counter() - t_start}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if answer_acc is not None:
            record["answer_digit_accuracy"] = float(answer_acc)  # this process's rows
        log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", bpb=f"{record['bits_per_byte']:.3f}",
                        tok_s=f"{record['tokens_per_s']:.0f}")
        last_step = step == end or (cfg.max_minutes and train_seconds >= cfg.max_minutes * 60)
        if valid_tokens is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last_step):
            if dd.main:
                result = evaluate_tokens(model, valid_tokens, cfg.eval_window, device, bytes_per_token=bytes_per_token,
                                         max_tokens=cfg.eval_tokens or None, bf16=cfg.bf16, progress=False)
                entry = {"step": step, "valid_bits_per_byte": result["bits_per_byte"], "valid_tokens": result["tokens"]}
                log.write(entry)
                summary["valid"].append(entry)
                bar.write(f"step {step}: valid {result['bits_per_byte']:.4f} bits/byte over {result['tokens']} tokens")
            if dd.world > 1:
                dist.barrier()
        if (cfg.save_every and step % cfg.save_every == 0) or last_step:
            checkpoint(step)
    bar.close()
    summary.update({"step": step, "train_loss": loss_value, "tokens_seen": tokens_seen, "train_seconds": train_seconds,
                    "parameters": sum(p.numel() for p in model.parameters()), "checkpoint": str(ckpt_dir)})
    return summary


def _gather_states(state, dd: Distributed) -> list[tuple[dict[str, Tensor], dict[str, Any]]]:
    """Every rank's carried state, on rank 0 (CPU tensors), so one checkpoint resumes all ranks."""
    local = ({}, {"kind": None}) if state is None else state_to_tensors(state.to("cpu"))
    if dd.world == 1:
        return [local]
    gathered: list[Any] = [None] * dd.world
    dist.gather_object(local, gathered if dd.main else None, dst=0)
    return gathered if dd.main else []
