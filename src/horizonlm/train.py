"""``horizon train``: long-stream training with truncated backprop through time.

``B`` contiguous streams advance one window of ``L`` tokens per step; HorizonLM carries its state
(detached) from one window to the next, so it learns to use context beyond the window (so does the
GLA peer, unless its ``carry_state`` is off). The transformer baseline starts every window afresh
(its cache would grow without bound).
Runs under ``torchrun`` with DDP: ranks take disjoint streams of one global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from horizonlm.checkpoint import (
    MODEL_KINDS,
    Checkpoint,
    build_model,
    carries_state,
    checkpoint_info,
    load_checkpoint,
    point,
    save_checkpoint,
)
from horizonlm.config import HORIZON_PRESETS
from horizonlm.data.needles import DOORS
from horizonlm.data.stream import LongStreamBatcher, RetrievalMix, load_meta, open_split
from horizonlm.data.tokenizers import require_byte_level
from horizonlm.devices import resolve_device
from horizonlm.errors import HorizonError, Stopped
from horizonlm.evaluate import evaluate_tokens
from horizonlm.fileio import atomic_write_bytes, atomic_write_json
from horizonlm.layers.memory import reads_dropped
from horizonlm.layers.ssm import SSM_PARAM_TAG
from horizonlm.progress import show_bars
from horizonlm.state_io import state_from_tensors, state_to_tensors

DEFAULT_DATA = "runs/data/shakespeare"

RESUMABLE = frozenset({"steps", "max_minutes", "budget_includes_validation", "kernel_warmup", "stop_after",
                       "eval_every", "eval_tokens", "eval_window", "save_every", "save_streams", "device", "compile",
                       "progress", "resume", "overwrite", "out", "data"})
"""Settings a resumed run may change: how long it goes on, how it is validated and saved, where
it runs. Every other setting must equal the saved run's; the data is compared by content."""

PER_INVOCATION = ("resume", "overwrite", "stop_after")
"""Settings of one invocation, never taken over from the saved config.json on ``--resume``."""


def default_out(data: str) -> str:
    """The run folder of a run on ``data`` when none is given: ``runs/`` plus the data folder's name."""
    return str(Path("runs") / (Path(data).name or "run"))


@dataclass
class OptimizerSettings:
    """AdamW and its schedule, shared by ``horizon train`` and the recall bench (the peak rate of
    the weights is each one's own: ``lr``, or the recall bench's swept ``lrs``)."""

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


@dataclass
class TrainConfig(OptimizerSettings):
    """Everything ``horizon train`` reads; each field is also a command-line flag (the optimiser's
    from :class:`OptimizerSettings`)."""

    data: str = DEFAULT_DATA
    """Folder made by ``horizon prepare`` (meta.json + train/valid .bin)."""
    out: str = ""
    """Run folder: checkpoints/, log.jsonl, config.json (default: runs/ plus the data folder's name)."""
    model: str = "horizon"
    """``horizon``, ``transformer`` (the baseline, same loop) or ``gla`` (flash-linear-attention's
    Gated Linear Attention, a peer; needs the ``[peers]`` extra and a GPU)."""
    preset: str = "cpu"
    """Model preset (tiny, cpu, small, base); the transformer and the peer take the matching width and depth."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """Model config fields that replace the preset's (YAML ``model_overrides:`` mapping)."""
    batch_size: int = 16
    """B: streams per step, summed over all DDP ranks."""
    seq_len: int = 256
    """L: tokens per window."""
    steps: int = 1200
    """Optimizer steps; with ``max_minutes`` whichever ends first. How many fit in the budget depends
    on the machine and its load (on a small CPU the budget may end the demo first); the closing
    report says at which step training stopped."""
    max_minutes: float = 4.5
    """Time budget of this invocation, training and validation together (0: no limit). Training stops
    before a step that would leave the final validation less time than the last validation took
    (before one, an estimate from the training pace; at most half the budget); a validation the
    budget cuts short says how many tokens it scored. The cosine schedule still spans ``steps``."""
    budget_includes_validation: bool = True
    """Whether ``max_minutes`` bounds validation too, so the run ends inside it. False: it bounds the
    training steps alone and every validation runs to its end, however long (comparisons at equal
    training time, as ``horizon bench quality`` makes)."""
    kernel_warmup: int = 0
    """Forward and backward passes on random tokens before the budget's clock starts (the state
    carried from one to the next, then the gradients dropped; parameters, optimizer and random
    streams untouched): kernels compile and autotune there, not inside ``max_minutes``. A GPU
    library that autotunes on first call (flash-linear-attention's GLA: minutes on an H200) would
    otherwise spend a short budget on it; HorizonLM's first step costs about 2 s. 0: none."""
    retrieval_every: int = 0
    """Mix in recall episodes (generated facts, :mod:`horizonlm.data.episodes`, never the passkey
    benchmark's sentences) of this many windows, every fact asked at the end of the last;
    0: plain language modelling. Needs a byte-level tokenizer."""
    retrieval_rate: float = 0.5
    """Fraction of (stream, episode) pairs that carry a recall episode."""
    retrieval_weight: float = 1.0
    """Loss weight of the answers' target tokens (the rest weigh 1)."""
    retrieval_same_window: float = 0.0
    """Fraction of episodes whose keys are stated in the question's window (the rest: in an
    earlier window). Writing the memory learns only from these: carried entries are detached."""
    retrieval_keys: int = 1
    """Facts per episode: 1 to this many, each with its own label, each asked once."""
    retrieval_cloze: float = 0.0
    """Share of asked facts whose question ends with the fact's own words before its value (a
    cloze, :func:`horizonlm.data.episodes.cloze`): the induction memory's key can match only
    such a cue (``horizon passkey`` records each trial's cue overlap); the rest are asked in a
    drawn phrasing."""
    memory_read_dropout: float = 0.0
    """Share of streams whose memory read is left out for a whole training window (the memory
    still writes), drawn afresh each step: the model also learns to predict with nothing read,
    which is what an empty memory reads (a book's first chunk, a reset)."""
    reset_stream_every: int = 0
    """Give each stream a fresh state every this many windows, staggered over the streams (stream
    b at steps where ``(step + b * reset_stream_every // B) % reset_stream_every == 0``), as at a
    book's start, so that every step some streams read from an empty memory (0: never)."""
    reset_every: int = 0
    """Start from a fresh state every this many windows (0: only when the streams start over).
    Passkey training sets it to ``retrieval_every``: each episode then starts with an empty
    memory, and the training context is ``reset_every * seq_len`` tokens."""
    stop_after: int = 0
    """Stop this invocation after this many steps (0: run to ``steps``); resume later with ``--resume``.
    The schedule still spans ``steps``, so a run split into jobs equals one uninterrupted run."""
    lr: float = 6e-3
    """Peak learning rate of the weights."""
    eval_every: int = 250
    """Validate every this many steps (0: only at the end)."""
    eval_tokens: int = 262_144
    """Validate on at most this many tokens of the valid split (0: all of it). The cap keeps the
    validation of a large split short on a CPU; it is printed when training starts."""
    eval_window: int = 2048
    """Window length when streaming an evaluation split."""
    save_every: int = 250
    """Checkpoint every this many steps (and before every validation, at the end, and on Ctrl-C or
    SIGTERM). ``checkpoints/latest`` names the newest, ``checkpoints/best`` the best-validated one;
    ``--checkpoint RUN`` loads the latest, ``--checkpoint RUN/checkpoints/best`` the best."""
    save_streams: bool = True
    """Keep the training streams' carried state (S4D states, buffers, the memory) in every
    checkpoint, so a resume continues each stream exactly. Off, a checkpoint holds the weights,
    optimizer and RNG only and a resumed run starts its streams cold: for runs never resumed with
    a large memory (16 streams of a 4,096-chunk induction memory are 8.6 GB a checkpoint)."""
    seed: int = 0
    """Seed of the initialisation (data order is fixed by the step)."""
    device: str = "auto"
    """``auto`` (CUDA if present), ``cpu`` or ``cuda``."""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    compile: bool = False
    """``torch.compile`` the model."""
    resume: bool = False
    """Continue the run in ``out`` from its latest checkpoint, with its saved settings: same data
    order, optimizer and carried state. Only steps, budget, validation, saving and device may change."""
    overwrite: bool = False
    """Start the run in ``out`` again from scratch, deleting its checkpoints, log and config.
    Without it (or ``resume``) a folder that already holds a run is refused."""
    progress: bool | None = None
    """Show progress bars, training and validation (default: only when stderr is a terminal, so
    piped output holds no escape codes; ``--progress`` forces them). Without them each
    validation prints a line when it starts and when it ends."""

    def __post_init__(self) -> None:
        if not self.out:
            self.out = default_out(self.data)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        _check_choice("model", self.model, tuple(MODEL_KINDS))
        _check_choice("preset", self.preset, tuple(HORIZON_PRESETS))
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        for name in ("batch_size", "seq_len", "steps", "eval_window"):
            _check_range(name, getattr(self, name), low=1)
        for name in ("warmup", "kernel_warmup", "eval_every", "eval_tokens", "save_every", "stop_after",
                     "retrieval_every", "reset_every", "reset_stream_every", "seed", "max_minutes", "weight_decay",
                     "grad_clip"):
            _check_range(name, getattr(self, name), low=0)
        for name in ("min_lr_ratio", "retrieval_rate", "retrieval_same_window", "retrieval_cloze", "memory_read_dropout"):
            _check_range(name, getattr(self, name), low=0, high=1)
        for name in ("lr", "ssm_lr", "retrieval_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"beta2 must be in [0, 1), got {self.beta2}")
        _check_range("retrieval_keys", self.retrieval_keys, low=1, high=len(DOORS))
        if self.resume and self.overwrite:
            raise ValueError("overwrite starts the run again and `resume` continues it: give one of them")
        self._check_model_overrides()

    def _check_model_overrides(self) -> None:
        config_cls = MODEL_KINDS[self.model][1]
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(self.model_overrides) - known)
        if unknown:
            raise ValueError(f"model_overrides: {', '.join(map(repr, unknown))} is not a setting of the {self.model} "
                             f"model (its settings: {', '.join(sorted(known))})")
        try:
            self.model_config(256)
        except HorizonError as err:
            raise ValueError(f"model_overrides: {err}") from err

    def model_config(self, vocab_size: int) -> dict[str, Any]:
        overrides = {**self.model_overrides, "vocab_size": vocab_size}
        try:
            return MODEL_KINDS[self.model][1].preset(self.preset, **overrides).to_dict()
        except (ValueError, TypeError) as err:
            raise HorizonError(f"invalid model settings: {err}") from err


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_range(name: str, value: float, low: float, high: float | None = None) -> None:
    if not value >= low or (high is not None and not value <= high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def resumed_settings(given: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``horizon train --resume``: the run's saved config.json, with ``given``
    (the settings on the command line or in a YAML file) on top. :func:`train` then refuses a
    given setting that may not change (see ``RESUMABLE``) or data other than the run's."""
    out = Path(given.get("out") or default_out(given.get("data") or DEFAULT_DATA))
    path = out / "config.json"
    if not path.is_file():
        raise HorizonError(f"--resume: {out} holds no run to continue ({path} not found); give the run's folder "
                           "with --out")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HorizonError(f"--resume: {path} is not valid JSON ({err})") from err
    names = {f.name for f in dataclasses.fields(TrainConfig)} - set(PER_INVOCATION)
    return {**{k: v for k, v in saved.items() if k in names}, **given, "out": str(out), "resume": True}


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: OptimizerSettings, lr: float, fused: bool) -> torch.optim.AdamW:
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
        {"params": decay, "lr": lr, "base_lr": lr, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "lr": lr, "base_lr": lr, "weight_decay": 0.0},
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


class TrainingInterrupted(Stopped):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint; ``exit_code`` is the
    shell's code for that signal (130 for SIGINT, 143 for SIGTERM). A stop the user asked for,
    reported as such, not as an error."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """While installed, SIGINT (Ctrl-C) and SIGTERM ask training to stop after the current step,
    which then saves a checkpoint, or cut a running validation short (its step is saved before it
    starts); a second signal interrupts at once, losing at most the running step. Installed only
    in the main thread, the one Python delivers signals to."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after this step (or cutting the validation "
                         "short) with a checkpoint saved (send it again to stop at once, losing the running step)\n")

    def requested(self, dd: Distributed, device: torch.device) -> int | None:
        """The signal that asked any process to stop, or None; every rank gets the same answer."""
        if dd.world == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; returns a summary (final step, losses, validation bits per byte).
    Stopped by SIGINT or SIGTERM, it saves a checkpoint and raises :class:`TrainingInterrupted`."""
    dd = setup_distributed(resolve_device(cfg.device).type)
    trainer = None
    try:
        _check_run_folder(cfg)
        if dd.world > 1:
            dist.barrier()  # every rank checks the folder before rank 0 writes into it
        device = resolve_device(cfg.device, dd.local_rank)
        if cfg.batch_size % dd.world != 0:
            raise HorizonError(f"batch_size={cfg.batch_size} must divide evenly over {dd.world} processes")
        trainer = _Trainer(cfg, dd, device, _open_data(cfg, dd))
        with StopSignals() as stop:
            return trainer.run(stop)
    finally:
        if dd.world > 1:
            _leave_process_group(trainer)


def _leave_process_group(trainer: _Trainer | None) -> None:
    """Free the DDP model while every rank is still there, then leave the group. (Freed after the
    group was destroyed, the DDP reducer's last reference tore the gloo group down on its own and
    could wait forever for a rank that had already exited.)"""
    if trainer is not None:
        trainer.net = None
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


RUN_FILES = ("checkpoints", "log.jsonl", "config.json")
"""What a run folder holds; a new run refuses a folder holding any of them (see ``overwrite``)."""


def _check_run_folder(cfg: TrainConfig) -> None:
    """Refuse to start a new run where one exists, unless ``resume`` or ``overwrite`` says what to do."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise HorizonError(f"--out {out} is a file; give a folder")
    found = [name for name in RUN_FILES if (out / name).exists()]
    latest = out / "checkpoints" / "latest"
    no_checkpoint = (f"holds a run with no checkpoint ({', '.join(found) or 'nothing'}), which cannot be resumed; "
                     "pass --overwrite to delete it and start again, or --out to train into another folder")
    if cfg.resume and not latest.is_file():
        raise HorizonError(f"--resume: {out} {no_checkpoint}")
    if cfg.resume or cfg.overwrite or not found:
        return
    if not latest.is_file():
        raise HorizonError(f"{out} {no_checkpoint}")
    raise HorizonError(f"{out} already holds a run (latest checkpoint {latest.read_text().strip()}); pass --resume "
                       "to continue it, --overwrite to delete it and start again, or --out to train into another "
                       "folder")


@dataclass
class _TrainData:
    """The prepared data of a run, opened."""

    meta: dict[str, Any]
    valid: np.ndarray | None
    batcher: LongStreamBatcher
    bytes_per_token: float
    """Bytes of text per token of the train split, to turn nats per token into bits per byte."""


def _open_data(cfg: TrainConfig, dd: Distributed) -> _TrainData:
    meta = load_meta(cfg.data)
    train_tokens = open_split(cfg.data, "train")
    valid = open_split(cfg.data, "valid") if "valid" in meta["splits"] else None
    if cfg.retrieval_every:
        require_byte_level(meta["tokenizer"], f"passkey episodes (retrieval_every) write bytes into {cfg.data}")
    mix = (RetrievalMix(cfg.retrieval_every, cfg.retrieval_rate, cfg.seed, cfg.retrieval_weight,
                        cfg.retrieval_same_window, cfg.retrieval_keys, cfg.retrieval_cloze)
           if cfg.retrieval_every else None)
    local_batch = cfg.batch_size // dd.world
    batcher = LongStreamBatcher(train_tokens, cfg.batch_size, cfg.seq_len, first_stream=dd.rank * local_batch,
                                local_batch=local_batch, retrieval=mix)
    split = meta["splits"]["train"]
    return _TrainData(meta=meta, valid=valid, batcher=batcher, bytes_per_token=split["bytes"] / split["tokens"])


def _check_resumable(cfg: TrainConfig, info: dict[str, Any], meta: dict[str, Any]) -> None:
    """Refuse to resume with settings other than the run's (except ``RESUMABLE`` ones) or other data."""
    saved = info.get("train_config") or {}
    changed = [f"--{name.replace('_', '-')} (saved {saved[name]!r}, now {getattr(cfg, name)!r})"
               for name in sorted(saved) if name not in RESUMABLE and hasattr(cfg, name)
               and saved[name] != getattr(cfg, name)]
    if changed:
        raise HorizonError("--resume continues the run as it was saved, and these settings differ from it: "
                           f"{'; '.join(changed)}. Leave them out to use the saved values, or start a new run "
                           "with another --out")
    recorded = info.get("data_meta_sha")
    current = {name: split.get("sha256") for name, split in meta["splits"].items()}
    if recorded is not None and recorded != current:
        differ = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
        raise HorizonError(f"--resume: {cfg.data} is not the data this run was trained on "
                           f"({info.get('data') or saved.get('data')}): its {', '.join(differ)} split differs. "
                           "Resume with the run's own data, or start a new run with another --out")


BEST_RECORD = "best.json"
"""Beside ``checkpoints/best``: the step, checkpoint and validation score it was chosen for."""

_now = time.perf_counter
"""The clock of the time budget (a test replaces it)."""


class _Budget:
    """The time budget of one invocation (``max_minutes``): training and validation together.

    Training stops before a step that would eat into the time kept for the final validation
    (:attr:`reserve`); a validation still running when the budget is spent is cut short. Built
    with ``includes_validation=False``, it counts the training steps alone: training stops once
    they have taken the budget, and validations are never cut."""

    def __init__(self, minutes: float, valid_tokens: int, step_tokens: int, includes_validation: bool = True) -> None:
        self.seconds = minutes * 60 if minutes else math.inf
        self.start = _now()
        self.includes_validation = includes_validation
        self.valid_tokens, self.step_tokens = valid_tokens, step_tokens
        """Tokens a validation scores (0: none) and tokens one training step reads on this process."""
        self.steps, self.step_total = 0, 0.0
        self.valid_seconds: float | None = None
        """How long the last complete validation took."""

    def left(self) -> float:
        if not self.includes_validation:
            return self.seconds - self.step_total
        return self.start + self.seconds - _now()

    def validation_over(self) -> bool:
        return self.includes_validation and self.left() <= 0

    def stepped(self, seconds: float) -> None:
        self.steps += 1
        self.step_total += seconds

    @property
    def step_seconds(self) -> float:
        """The mean training step of this invocation."""
        return self.step_total / self.steps if self.steps else 0.0

    @property
    def reserve(self) -> float:
        """Seconds kept for the final validation: what the last complete one took, or before one
        an estimate at the training pace, a scored token costed as a trained one (a forward pass
        alone is cheaper, so it errs long: on a lightly loaded 2-core CPU the demo validated ~28K tokens/s
        and trained ~6.5K; on a loaded one both ran near 1.4K); at most half the budget."""
        if not self.valid_tokens or not math.isfinite(self.seconds) or not self.includes_validation:
            return 0.0
        wanted = (self.valid_seconds if self.valid_seconds is not None
                  else self.valid_tokens * self.step_seconds / self.step_tokens)
        return min(wanted, 0.5 * self.seconds)

    def training_over(self) -> bool:
        if not self.includes_validation:
            return self.left() <= 0
        return self.left() < self.reserve + self.step_seconds

    def steps_left(self) -> int:
        """Steps that fit before training stops, at this invocation's pace."""
        return int(max(0.0, self.left() - self.reserve) // max(self.step_seconds, 1e-9))

    def validated(self, seconds: float) -> None:
        """A complete validation took ``seconds``: keep that much for the final one."""
        self.valid_seconds = seconds


def _read_best(ckpt_dir: Path) -> dict[str, Any] | None:
    """The run's best validation so far (``best.json``), or None."""
    path = ckpt_dir / BEST_RECORD
    if not (ckpt_dir / "best").is_file() or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return {**record, "checkpoint": str(ckpt_dir / record["checkpoint"])}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise HorizonError(f"{path} is not a record of the best validation ({err}); delete it and "
                           f"{ckpt_dir / 'best'} to resume") from err


class _Trainer:
    """One invocation of training: the model, optimizer, carried state and log, step by step."""

    def __init__(self, cfg: TrainConfig, dd: Distributed, device: torch.device, data: _TrainData) -> None:
        self.cfg, self.dd, self.device, self.data = cfg, dd, device, data
        self.ckpt_dir = Path(cfg.out) / "checkpoints"
        model_config = cfg.model_config(data.meta["vocab_size"])
        torch.manual_seed(cfg.seed)
        resumed = None
        if cfg.resume:
            _check_resumable(cfg, checkpoint_info(self.ckpt_dir)[1], data.meta)
            resumed = load_checkpoint(self.ckpt_dir, expect_kind=cfg.model, expect_config=model_config,
                                      with_train_state=True)
        self.model = (resumed.model if resumed else build_model(cfg.model, model_config)).to(device)
        self.carry_state = carries_state(self.model)
        self.opt = make_optimizer(self.model, cfg, cfg.lr, fused=device.type == "cuda")
        self.step = int(resumed.info["step"]) if resumed else 0
        self.saved_step = self.step if resumed else -1
        self.tokens_seen = int(resumed.info.get("tokens_seen", 0)) if resumed else 0
        self.train_seconds = float(resumed.info.get("train_seconds", 0.0)) if resumed else 0.0
        """Seconds of training steps over every invocation of the run (validation and saving not counted)."""
        self.best = _read_best(self.ckpt_dir) if resumed else None
        self.bars = show_bars(cfg.progress)
        self.validated_step = -1
        self.carried = self._restore(resumed) if resumed else None
        self._write_run_files()
        self.log = _Log(Path(cfg.out) / "log.jsonl", self.step if resumed else None, dd.main)
        self.net = self._wrap(self.model)
        self.autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                                       enabled=device.type == "cuda" and cfg.bf16)

    def _restore(self, ckpt: Checkpoint) -> Any:
        """Optimizer and RNG state from the checkpoint; returns this rank's carried model state."""
        tensors = {k: v.to(self.device) for k, v in ckpt.train_tensors.items()}
        _load_optimizer(self.opt, tensors, ckpt.info["optimizer"])
        torch.set_rng_state(ckpt.train_tensors["rng.cpu"])
        states = ckpt.info.get("carried_states")
        if not self.carry_state or states is None:
            return None
        rank = self.dd.rank
        header = states[rank] if rank < len(states) else None
        if header is None or ckpt.info.get("world", 1) != self.dd.world:
            raise HorizonError("resume needs the same number of processes as the run that saved the checkpoint")
        return None if header.get("kind") is None else state_from_tensors(tensors, header, prefix=f"state{rank}.")

    def _write_run_files(self) -> None:
        """With ``overwrite``, delete the old run; then write config.json (rank 0)."""
        if not self.dd.main:
            return
        out = Path(self.cfg.out)
        if self.cfg.overwrite:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            for name in ("log.jsonl", "config.json"):
                (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.json", json.dumps(dataclasses.asdict(self.cfg), indent=2).encode())

    def _wrap(self, model: nn.Module) -> nn.Module:
        net = torch.compile(model) if self.cfg.compile else model
        if self.dd.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
        return net

    def run(self, stop: StopSignals) -> dict[str, Any]:
        """Train until ``steps``, ``stop_after`` steps or the time budget, validating and saving on
        schedule, then save and validate once more. A checkpoint is always written before a
        validation, so a stop during one (which cuts it short) loses nothing."""
        cfg = self.cfg
        end = min(cfg.steps, self.step + cfg.stop_after) if cfg.stop_after else cfg.steps
        summary: dict[str, Any] = {"start_step": self.step, "valid": []}
        self._announce_validation()
        self._warm_up_kernels(cfg.kernel_warmup)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (self.bars and self.dd.main), unit="step",
                   dynamic_ncols=True)
        budget = _Budget(cfg.max_minutes, valid_tokens=self._valid_tokens(),
                         step_tokens=cfg.batch_size // self.dd.world * cfg.seq_len,
                         includes_validation=cfg.budget_includes_validation)
        t_start, session_seconds, loss = time.perf_counter(), 0.0, float("nan")
        over = self._rank0_says(budget.training_over())
        while self.step < end and not over:
            t_step = _now()
            record = self.train_step(t_start)
            budget.stepped(_now() - t_step)
            session_seconds += record["seconds"]
            loss = record["loss"]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", bpb=f"{record['bits_per_byte']:.3f}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            if self.step - summary["start_step"] == 3:  # the first step is slow everywhere: judge the third
                self._warn_if_slow(end, budget, bar)
            over = self._rank0_says(budget.training_over())
            last = self.step == end or over
            validate_now = (self.data.valid is not None and bool(cfg.eval_every) and self.step % cfg.eval_every == 0
                            and not last)
            if (cfg.save_every and self.step % cfg.save_every == 0) or validate_now or last:
                self.save()
            if validate_now:
                summary["valid"] += self.validate(bar, stop, budget)
            signum = stop.requested(self.dd, self.device)
            if signum is not None and not last:
                bar.close()
                raise self.interrupted(signum)
        bar.close()
        if self.step > summary["start_step"] and self.data.valid is not None and self.validated_step != self.step:
            summary["valid"] += self.validate(bar, stop, budget)
            signum = stop.requested(self.dd, self.device)
            if signum is not None and self.step < cfg.steps:
                raise self.interrupted(signum)
        summary.update({"step": self.step, "train_loss": loss, "tokens_seen": self.tokens_seen,
                        "train_seconds": self.train_seconds, "session_train_seconds": session_seconds,
                        "parameters": sum(p.numel() for p in self.model.parameters()),
                        "checkpoint": str(self.ckpt_dir), "latest": str(self.ckpt_dir / f"step-{self.step:08d}"),
                        "best": self.best})
        return summary

    def _warm_up_kernels(self, passes: int) -> None:
        """``kernel_warmup``: ``passes`` forward and backward passes on random tokens of a step's
        shape, the state carried between them as in training (a state given and none can be
        different kernels), before the clock starts; then the gradients are dropped. The random
        streams are forked, so training afterwards is the same as without."""
        if not passes:
            return
        shape = (self.cfg.batch_size // self.dd.world, self.cfg.seq_len)
        vocab = int(self.data.meta["vocab_size"])
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            state = None
            for _ in range(passes):
                x = torch.randint(0, vocab, shape, device=self.device)  # (B, L)
                with self.autocast:
                    logits, new_state = self.net(x, state)  # (B, L, V)
                lm_loss(logits, x).backward()
                state = new_state.detach() if self.carry_state else None
        self.opt.zero_grad(set_to_none=True)

    def _rank0_says(self, decision: bool) -> bool:
        """Rank 0's ``decision``, on every rank: each rank's budget has its own clock, and only rank 0
        times the validation, so left to themselves they could stop at different steps."""
        if self.dd.world == 1:
            return decision
        flag = torch.tensor([int(decision)], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def _warn_if_slow(self, end: int, budget: _Budget, bar: tqdm) -> None:
        """On a CPU, say early when this configuration will not get far at the last step's pace: a
        recipe sized for a GPU (the passkey ones) takes seconds a step here, and the budget or the
        clock would tell late."""
        if self.device.type != "cpu" or not self.dd.main:
            return
        left, step_seconds = end - self.step, budget.step_seconds
        if math.isfinite(budget.left()):
            reach = self.step + budget.steps_left()
            if reach < self.step + left // 2:
                bar.write(f"warning: {step_seconds:.1f} s a step on the CPU: the {self.cfg.max_minutes:g}-minute "
                          f"budget ends training near step {reach:,} of {end:,} (a configuration sized for a GPU? "
                          "raise --max-minutes or lower --steps to train it through)", file=sys.stderr)
        elif left * step_seconds > 3600:
            bar.write(f"warning: {step_seconds:.1f} s a step on the CPU: the {left:,} steps left take about "
                      f"{left * step_seconds / 3600:.1f} hours (a configuration sized for a GPU?)", file=sys.stderr)

    def _valid_tokens(self) -> int:
        """Tokens one validation scores (0: no valid split)."""
        if self.data.valid is None:
            return 0
        total = len(self.data.valid) - 1
        return min(total, self.cfg.eval_tokens) if self.cfg.eval_tokens else total

    def _announce_validation(self) -> None:
        """Say how much of the valid split each validation reads (the default caps it)."""
        if not self.dd.main or self.data.valid is None:
            return
        total, cap = len(self.data.valid) - 1, self.cfg.eval_tokens
        if cap and cap < total:
            print(f"validation: the first {cap:,} of the {total:,} valid tokens (--eval-tokens; 0 for all)", flush=True)
        else:
            print(f"validation: all {total:,} valid tokens", flush=True)

    def train_step(self, t_start: float) -> dict[str, Any]:
        """One optimizer step on the next window of every stream; logs and returns its record."""
        cfg, step = self.cfg, self.step
        t0 = time.perf_counter()
        if self.data.batcher.starts_epoch(step) or (cfg.reset_every and step % cfg.reset_every == 0):
            self.carried = None
        if cfg.reset_stream_every and self.carried is not None:
            self.carried = self.carried.reset_streams(self._fresh_streams(step))
        x, y, weight = self.data.batcher.batch(step)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        factor = lr_factor(step, cfg.steps, cfg.warmup, cfg.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        with self.autocast, self._reads_dropped(step):
            logits, new_state = self.net(x, self.carried if self.carry_state else None)
        loss, answer_acc = self._backward(logits, y, weight)
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.carried = new_state.detach() if self.carry_state else None
        self.step += 1
        self.tokens_seen += cfg.batch_size * cfg.seq_len
        dt = time.perf_counter() - t0
        self.train_seconds += dt
        record = {"step": self.step, "loss": loss, "bits_per_byte": loss / math.log(2) / self.data.bytes_per_token,
                  "lr": cfg.lr * factor, "tokens": self.tokens_seen, "tokens_per_s": cfg.batch_size * cfg.seq_len / dt,
                  "time": time.perf_counter() - t_start}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if answer_acc is not None:
            record["answer_digit_accuracy"] = answer_acc  # this process's rows
        self.log.write(record)
        return {**record, "seconds": dt}

    def _reads_dropped(self, step: int) -> contextlib.AbstractContextManager:
        """The memory's read left out for the streams drawn for ``step`` (``memory_read_dropout``;
        a pure function of seed and step, the same on resume)."""
        memory = getattr(self.model, "memory", None)
        if not self.cfg.memory_read_dropout or memory is None:
            return contextlib.nullcontext()
        draw = torch.rand(self.cfg.batch_size, generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step))
        first = self.data.batcher.first_stream
        dropped = draw[first : first + self.data.batcher.local_batch] < self.cfg.memory_read_dropout  # (B,)
        return reads_dropped(memory, dropped.to(self.device).view(-1, 1, 1))

    def _fresh_streams(self, step: int) -> Tensor:
        """Which of this process's streams start afresh at ``step`` (see ``reset_stream_every``). (B,)"""
        every = self.cfg.reset_stream_every
        first = self.data.batcher.first_stream
        streams = torch.arange(first, first + self.data.batcher.local_batch)  # (B,)
        return ((step + streams * every // self.cfg.batch_size) % every == 0).to(self.device)  # (B,)

    def _backward(self, logits: Tensor, y: Tensor, weight: Tensor | None) -> tuple[float, float | None]:
        """Backpropagate the objective; returns the mean loss over all ranks (stopping on a
        non-finite one) and the answer-digit accuracy of passkey windows (None without any)."""
        answer_acc = None
        if weight is None:
            loss = objective = lm_loss(logits, y)
        else:
            weight = weight.to(self.device)
            loss, objective = weighted_loss(logits, y, weight)
            acc = answer_digit_accuracy(logits, y, weight)
            answer_acc = None if acc is None else float(acc)
        objective.backward()
        loss_sum = loss.detach().clone()
        if self.dd.world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= self.dd.world
        value = loss_sum.item()
        if not math.isfinite(value):
            latest = self.ckpt_dir / "latest"
            last = latest.read_text().strip() if latest.is_file() else "none"
            raise HorizonError(f"loss became {value} at step {self.step}; stopped without saving "
                               f"(last good checkpoint: {last})")
        return value, answer_acc

    def validate(self, bar: tqdm, stop: StopSignals, budget: _Budget) -> list[dict[str, Any]]:
        """Score the valid split (rank 0; at most ``eval_tokens``) of the step just saved; returns
        the log entry, if any. A stop request or the end of the time budget cuts it short after
        the running window; the line it prints says how many tokens it scored. A complete
        validation better than every earlier one makes its checkpoint the run's ``best``."""
        entries = []
        self.validated_step = self.step
        if self.dd.main:
            cfg = self.cfg
            planned = self._valid_tokens()
            if not self.bars:
                bar.write(f"step {self.step}: validating on {planned:,} tokens", file=sys.stdout)
            t0 = _now()
            result = evaluate_tokens(self.model, self.data.valid, cfg.eval_window, self.device,
                                     bytes_per_token=self.data.bytes_per_token, max_tokens=cfg.eval_tokens or None,
                                     bf16=cfg.bf16, progress=self.bars, desc="valid",
                                     until=lambda: stop.signum is not None or budget.validation_over())
            seconds = _now() - t0
            bpb, tokens = result["bits_per_byte"], result["tokens"]
            entry = {"step": self.step, "valid_bits_per_byte": bpb, "valid_tokens": tokens, "valid_seconds": seconds}
            note = ""
            if result["complete"]:
                budget.validated(seconds)
                self._keep_best(entry)
            else:
                entry["valid_complete"] = False
                why = (f"stopped by {signal.Signals(stop.signum).name}" if stop.signum is not None
                       else f"the {cfg.max_minutes:g}-minute budget ran out")
                note = f" (cut short: {why}; {tokens:,} of the {planned:,} tokens scored, not compared for the best)"
            self.log.write(entry)
            entries.append(entry)
            bar.write(f"step {self.step}: valid {bpb:.4f} bits/byte over {tokens:,} tokens in {seconds:.0f} s{note}")
        if self.dd.world > 1:
            dist.barrier()
        return entries

    def _keep_best(self, entry: dict[str, Any]) -> None:
        """Point ``checkpoints/best`` at this step's checkpoint when its validation beats the best
        one so far (record first, pointer second, each written atomically)."""
        if self.best is not None and not entry["valid_bits_per_byte"] < self.best["valid_bits_per_byte"]:
            return
        name = f"step-{self.step:08d}"
        self.best = {"checkpoint": str(self.ckpt_dir / name), "step": self.step,
                     "valid_bits_per_byte": entry["valid_bits_per_byte"], "valid_tokens": entry["valid_tokens"]}
        atomic_write_json(self.ckpt_dir / BEST_RECORD, {**self.best, "checkpoint": name})
        point(self.ckpt_dir, "best", name)

    def save(self) -> None:
        """Checkpoint the weights, optimizer, RNG and every rank's carried state (unless
        ``save_streams`` is off; written by rank 0)."""
        opt_tensors, opt_header = _optimizer_tensors(self.opt)
        state_tensors, headers = {}, []
        carried = self.carried if self.carry_state and self.cfg.save_streams else None
        for rank, (tensors, header) in enumerate(_gather_states(carried, self.dd)):
            state_tensors.update({f"state{rank}.{k[len('state.'):]}": v for k, v in tensors.items()})
            headers.append(header)
        self.saved_step = self.step
        if not self.dd.main:
            return
        meta, cfg = self.data.meta, self.cfg
        info = {"tokenizer": meta["tokenizer"], "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                "optimizer": opt_header,
                "carried_states": headers, "world": self.dd.world, "train_config": dataclasses.asdict(cfg),
                "data": str(Path(cfg.data).resolve()),
                "data_meta_sha": {k: v.get("sha256") for k, v in meta["splits"].items()}}
        train_tensors = {**opt_tensors, **state_tensors, "rng.cpu": torch.get_rng_state()}
        save_checkpoint(self.ckpt_dir, self.step, self.model, info, train_tensors)

    def interrupted(self, signum: int) -> TrainingInterrupted:
        """Save (unless this step just was) and say how to go on."""
        if self.saved_step != self.step:
            self.save()
        name = signal.Signals(signum).name
        return TrainingInterrupted(
            f"stopped by {name} after step {self.step} of {self.cfg.steps}; checkpoint saved in "
            f"{self.ckpt_dir / f'step-{self.step:08d}'}. Continue with: horizon train --out {self.cfg.out} --resume",
            exit_code=128 + signum)


def _gather_states(state, dd: Distributed) -> list[tuple[dict[str, Tensor], dict[str, Any]]]:
    """Every rank's carried state, on rank 0 (CPU tensors), so one checkpoint resumes all ranks."""
    local = ({}, {"kind": None}) if state is None else state_to_tensors(state.to("cpu"))
    if dd.world == 1:
        return [local]
    gathered: list[Any] = [None] * dd.world
    dist.gather_object(local, gathered if dd.main else None, dst=0)
    return gathered if dd.main else []
