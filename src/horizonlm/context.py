"""Saved contexts: the state of a model after reading any amount of text, on disk.

A context folder holds ``state.safetensors`` (S4D states, conv buffers, supervisor state, what
the memory carries beside its store), the memory (``memory.safetensors`` with keys, values and
positions, plus ``memory.faiss`` for a FAISS backend) and ``manifest.json``: format version, the
model fingerprint (config and weights hash), the stream position, what was read from which
file, and the sha256 of every file. Loading refuses another model or a damaged file. A save is
written to a temporary folder and renamed into place, so a kill during a save leaves the previous
context intact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from horizonlm.errors import HorizonError
from horizonlm.fileio import check_files, replace_dir, sha256_file
from horizonlm.memory.store import MemoryStore, StoreConfig
from horizonlm.model import HorizonLM
from horizonlm.state import HorizonState, StoreMemoryState
from horizonlm.state_io import state_from_tensors, state_to_tensors

CONTEXT_FORMAT = 1
CARRIED = {"store.last_key": "last_key", "store.tail": "tail"}
"""What a store-backed memory carries beside its store (the induction memory's last key, the key span's
tail), by its name in ``state.safetensors``."""


def carried_tensors(memory: StoreMemoryState) -> dict[str, Tensor]:
    """The carried tensors a store-backed memory has, by file name."""
    return {name: getattr(memory, field) for name, field in CARRIED.items() if getattr(memory, field) is not None}


def model_fingerprint(model: HorizonLM) -> str:
    """sha256 over the config (JSON) and every weight tensor, in name order."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_context(folder: str | Path, model: HorizonLM, state: HorizonState, extra: dict[str, Any] | None = None,
                 fingerprint: str | None = None) -> None:
    """Write ``state`` (its memory in a store) to ``folder`` atomically."""
    if not isinstance(state.memory, StoreMemoryState):
        raise ValueError("save_context needs a state whose memory lives in a store (init_state(store_config=...))")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tensors, header = state_to_tensors(replace(state, memory=None).to("cpu"))
        for name, carried in carried_tensors(state.memory).items():
            tensors[name] = carried.detach().cpu().contiguous()
        save_file(tensors, str(tmp / "state.safetensors"))
        names = ["state.safetensors", *state.memory.store.save(tmp)]
        manifest = {
            "format": CONTEXT_FORMAT,
            "model_fingerprint": fingerprint or model_fingerprint(model),
            "model_config": model.config.to_dict(),
            "position": state.pos,
            "state_header": header,
            "store_config": asdict(state.memory.store.config),
            "store": state.memory.store.describe(),
            "files": {name: sha256_file(tmp / name) for name in names},
            **(extra or {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        old = Path(folder).parent / f".{Path(folder).name}.old"
        hint = f" (a save was interrupted: the previous context is in {old})" if old.is_dir() else ""
        raise HorizonError(f"no saved context at {folder}{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HorizonError(f"saved context {folder}: manifest.json is damaged ({err})") from err
    if manifest.get("format") != CONTEXT_FORMAT:
        raise HorizonError(f"saved context {folder} has format {manifest.get('format')!r}, expected {CONTEXT_FORMAT}")
    return manifest


def load_context(folder: str | Path, model: HorizonLM, device: torch.device | str = "cpu",
                 fingerprint: str | None = None) -> tuple[HorizonState, dict[str, Any]]:
    """The saved state, checked against ``model`` and every file's sha256."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["model_fingerprint"] != (fingerprint or model_fingerprint(model)):
        raise HorizonError(f"saved context {folder} was made by another model (config or weights differ)")
    check_files(folder, manifest["files"], f"saved context {folder}")
    try:
        tensors = load_file(str(folder / "state.safetensors"), device=str(device))
        store = MemoryStore.load(folder, StoreConfig(**manifest["store_config"]), device)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise HorizonError(f"saved context {folder} cannot be read: {err}") from err
    carried = {field: tensors.pop(name, None) for name, field in CARRIED.items()}
    expected = model.memory.initial_carried(1)
    for field, tensor in carried.items():
        if (tensor is None) != (expected[field] is None):
            raise HorizonError(f"saved context {folder}: the memory's {field} is "
                               f"{'missing' if tensor is None else 'present, but this model carries none'}")
    state = state_from_tensors(tensors, manifest["state_header"])
    memory = StoreMemoryState(store=store, entries=store.first_id + len(store), pos=state.pos, **carried)
    return replace(state, memory=memory), manifest
