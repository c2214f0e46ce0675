"""Checkpoints: weights in safetensors, config and bookkeeping in JSON, every file checksummed.

A checkpoint is a folder ``step-NNNNNNNN`` written under a temporary name and renamed into
place in one step; the ``latest`` file, replaced atomically afterwards, names the newest one
(and training's ``best`` file the best-validated one). A crash or a full disk during a save
leaves the previous checkpoint as ``latest``, intact. Loading never unpickles: safetensors and
JSON only.

Any folder with a ``checkpoint.json`` is a checkpoint: ``horizon export`` writes one beside the
Hugging Face files, so this module loads an exported folder without knowing that layout (the
weight names there carry the ``weight_prefix`` it records).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from horizonlm.baseline import TransformerLM
from horizonlm.config import HorizonConfig, TransformerConfig
from horizonlm.errors import HorizonError
from horizonlm.fileio import atomic_dir, atomic_write_bytes, check_files, sha256_file
from horizonlm.model import HorizonLM
from horizonlm.peers.gla import GLAPeerConfig, GLAPeerLM

CHECKPOINT_FORMAT = 1
POINTERS = ("latest", "best")
"""Files beside the ``step-*`` folders, each naming one of them; a folder one names is never pruned."""
MODEL_KINDS = {"horizon": (HorizonLM, HorizonConfig), "transformer": (TransformerLM, TransformerConfig),
               "gla": (GLAPeerLM, GLAPeerConfig)}
"""Model kind -> (model class, config class). ``gla`` is a peer (:mod:`horizonlm.peers.gla`): its
library is imported only when one is built."""


def model_kind(model: nn.Module) -> str:
    for kind, (model_cls, _) in MODEL_KINDS.items():
        if isinstance(model, model_cls):
            return kind
    raise ValueError(f"not a model of horizonlm: {type(model).__name__}")


def carries_state(model: nn.Module) -> bool:
    """Whether training and scoring carry ``model``'s state from one window to the next: always
    HorizonLM's, a peer's when its config says so, never the transformer's (its cache grows with
    the stream, so its context is the window)."""
    return isinstance(model, HorizonLM) or bool(getattr(model, "carries_state", False))


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    if kind not in MODEL_KINDS:
        raise HorizonError(f"model kind must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
    model_cls, config_cls = MODEL_KINDS[kind]
    try:
        return model_cls(config_cls.from_dict(config))
    except ValueError as err:
        raise HorizonError(f"invalid {kind} config: {err}") from err


def _weights(model: nn.Module) -> dict[str, Tensor]:
    """State dict without the tied head (safetensors refuses shared storage)."""
    sd = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        sd.pop("head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    path: Path
    model: nn.Module
    info: dict[str, Any]
    """The contents of checkpoint.json (kind, config, tokenizer, step, ...)."""
    train_tensors: dict[str, Tensor] | None


def save_checkpoint(root: str | Path, step: int, model: nn.Module, info: dict[str, Any],
                    train_tensors: dict[str, Tensor] | None = None, keep: int = 2) -> Path:
    """Write ``root/step-{step}`` atomically and point ``root/latest`` at it; then delete all but
    the newest ``keep`` checkpoints, except one a pointer (``best``) names."""
    root = Path(root)
    name = f"step-{step:08d}"
    with atomic_dir(root / name) as tmp:
        save_file(_weights(model), str(tmp / "model.safetensors"))
        files = ["model.safetensors"]
        if train_tensors is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in train_tensors.items()}, str(tmp / "train.safetensors"))
            files.append("train.safetensors")
        write_checkpoint_json(tmp, model, files, {"step": step, **info})
    point(root, "latest", name)
    named = {_pointed(root / pointer) for pointer in POINTERS}
    folders = sorted(p for p in root.glob("step-*") if p.is_dir())
    for p in folders[: max(0, len(folders) - keep)]:
        if p.name not in named:
            shutil.rmtree(p, ignore_errors=True)
    return root / name


def write_checkpoint_json(folder: Path, model: nn.Module, files: list[str], info: dict[str, Any]) -> None:
    """Make ``folder`` a checkpoint of ``model``: its checkpoint.json with the format, kind and
    config, the sha256 of each of ``files`` (already written there), and ``info`` on top.

    ``info`` may hold ``weight_prefix`` (put before every weight name in model.safetensors) and
    ``exported: true`` (a model folder without training state)."""
    meta = {"format": CHECKPOINT_FORMAT, "kind": model_kind(model), "config": model.config.to_dict(),
            "files": {name: sha256_file(folder / name) for name in files}, **info}
    (folder / "checkpoint.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def point(root: str | Path, pointer: str, name: str) -> None:
    """Make the pointer file ``root/pointer`` (one of ``POINTERS``) name the checkpoint ``name``, atomically."""
    if pointer not in POINTERS:
        raise ValueError(f"pointer must be one of {POINTERS}, got {pointer!r}")
    atomic_write_bytes(Path(root) / pointer, (name + "\n").encode())


def _pointed(pointer: Path) -> str | None:
    return pointer.read_text().strip() if pointer.is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder; a run or checkpoints folder, for the checkpoint its ``latest`` names;
    or a pointer file (``checkpoints/best``, ``checkpoints/latest``), for the one it names."""
    path = Path(path)
    if path.name in POINTERS and path.is_file():
        return path.parent / path.read_text().strip()
    for root in (path, path / "checkpoints"):
        latest = root / "latest"
        if latest.is_file():
            return root / latest.read_text().strip()
    return path


def run_folder(checkpoint_folder: str | Path) -> Path:
    """The run folder a checkpoint belongs to, where results about it are written: the folder
    above ``checkpoints/`` for a training run, else the folder that holds the ``step-*`` folders."""
    root = Path(checkpoint_folder).parent
    return root.parent if root.name == "checkpoints" else root


def checkpoint_info(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder ``path`` names (see :func:`resolve_checkpoint`) and its checkpoint.json,
    read and checked for format without loading any weights."""
    folder = resolve_checkpoint(path)
    meta_path = folder / "checkpoint.json"
    if not meta_path.is_file():
        hint = ""
        if (folder / "model.safetensors").is_file():
            hint = ("; a model folder without one (saved by save_pretrained, or exported by an older horizonlm) "
                    "becomes a checkpoint with `horizon export --checkpoint FOLDER --out NEW_FOLDER`")
        raise HorizonError(f"no checkpoint at {path} ({meta_path} not found{hint})")
    try:
        info = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HorizonError(f"corrupt checkpoint {folder}: checkpoint.json is not valid JSON ({err})") from err
    if info.get("format") != CHECKPOINT_FORMAT:
        raise HorizonError(f"checkpoint {folder} has format {info.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    return folder, info


def load_checkpoint(path: str | Path, expect_kind: str | None = None, expect_config: dict[str, Any] | None = None,
                    with_train_state: bool = False, map_location: str = "cpu") -> Checkpoint:
    """Load and verify a checkpoint (a training checkpoint or an exported folder). Every failure is
    a :class:`HorizonError` saying what is wrong."""
    folder, info = checkpoint_info(path)
    kind, config = info.get("kind"), info.get("config")
    if expect_kind is not None and kind != expect_kind:
        raise HorizonError(f"checkpoint {folder} holds a {kind} model, not the requested {expect_kind}")
    if expect_config is not None and config != expect_config:
        differ = sorted(k for k in set(config) | set(expect_config) if config.get(k) != expect_config.get(k))
        detail = ", ".join(f"{k}: checkpoint {config.get(k)!r} vs requested {expect_config.get(k)!r}" for k in differ)
        raise HorizonError(f"checkpoint {folder} does not match the requested model ({detail})")
    check_files(folder, info.get("files", {}), f"corrupt checkpoint {folder}")
    model = build_model(kind, config)
    try:
        weights = load_file(str(folder / "model.safetensors"), device=map_location)
    except (SafetensorError, OSError) as err:
        raise HorizonError(f"corrupt checkpoint {folder}: cannot read model.safetensors ({err})") from err
    prefix = info.get("weight_prefix", "")
    weights = {k.removeprefix(prefix): v for k, v in weights.items()}
    if getattr(model.config, "tie_embeddings", False):
        weights["head.weight"] = weights.get("embed.weight")
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)[:2]
    except RuntimeError as err:  # a shape that differs
        raise HorizonError(f"checkpoint {folder} weights do not fit its config ({err})") from err
    if missing or unexpected:
        raise HorizonError(f"checkpoint {folder} weights do not fit its config (missing {missing}, unexpected {unexpected})")
    train_tensors = None
    if with_train_state:
        file = folder / "train.safetensors"
        if info.get("exported"):
            raise HorizonError(f"{folder} is an exported model: it holds no training state to resume from")
        if not file.is_file():
            raise HorizonError(f"checkpoint {folder} has no training state to resume from")
        train_tensors = load_file(str(file), device=map_location)
    return Checkpoint(path=folder, model=model, info=info, train_tensors=train_tensors)
