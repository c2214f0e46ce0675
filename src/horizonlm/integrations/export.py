"""Hugging Face-style model folders: ``config.json`` (the model's own config fields plus the
``model_type`` that ``AutoConfig`` dispatches on), ``model.safetensors`` and a ``tokenizer.json``
that ``AutoTokenizer`` loads.

They are written and read here with json, safetensors and tokenizers only, so ``horizon export``
and loading such a folder need no ``transformers``; :mod:`horizonlm.integrations.hf` reads the
same folder with ``from_pretrained`` and writes it with ``save_pretrained``.

``horizon export`` also writes a ``checkpoint.json`` (:func:`horizonlm.checkpoint.write_checkpoint_json`):
the folder is then a checkpoint the core loads by itself, holding the training bookkeeping
(step, data) that commands such as ``horizon eval`` read. A folder without one (``save_pretrained``,
an older export) is read here (:func:`load_any`), and ``horizon export`` turns it into a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from horizonlm.checkpoint import (
    MODEL_KINDS,
    Checkpoint,
    build_model,
    load_checkpoint,
    model_kind,
    write_checkpoint_json,
)
from horizonlm.errors import HorizonError
from horizonlm.fileio import replace_dir

MODEL_TYPES = {"horizon": "horizonlm", "transformer": "horizonlm-transformer"}
"""``model_type`` in config.json for each model kind."""
ARCHITECTURES = {"horizon": "HorizonLMForCausalLM", "transformer": "HorizonTransformerForCausalLM"}
"""The transformers class of each kind (:mod:`horizonlm.integrations.hf`)."""
WEIGHT_PREFIX = "model."
"""The transformers wrapper holds the model as its ``model`` attribute, so its weight names start so."""
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
TOKENIZER_FILE, TOKENIZER_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"


@dataclass
class ExportConfig:
    """Settings of ``horizon export``."""

    checkpoint: str = ""
    """Checkpoint folder, run folder (its latest checkpoint) or exported folder to export."""
    out: str = ""
    """Folder to write: built beside it and renamed into place."""
    overwrite: bool = False
    """Replace ``out`` if it exists."""

    def __post_init__(self) -> None:
        for name in ("checkpoint", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name}: give the folder")


def byte_chars() -> list[str]:
    """The printable stand-in of each byte value (GPT-2's table, the alphabet of the ``tokenizers``
    ByteLevel pre-tokenizer), so token id i of the byte tokenizer is byte i."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


def byte_tokenizer_json() -> str:
    """A ``tokenizers`` BPE over the 256 bytes with no merges: ids equal UTF-8 byte values, as
    :class:`horizonlm.data.tokenizers.ByteTokenizer` encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(byte_chars())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def tokenizer_json(spec: dict[str, Any]) -> str:
    """The ``tokenizer.json`` text of a tokenizer spec (meta.json, checkpoint.json)."""
    kind = spec.get("kind", "byte")
    if kind == "byte":
        return byte_tokenizer_json()
    if kind == "bpe":
        return spec["json"]
    raise HorizonError(f"a {kind}-level tokenizer cannot be exported: AutoTokenizer has no exact equivalent of its "
                       "one <eos> per line; only byte-level and BPE models are exported")


def spec_from_tokenizer_json(text: str) -> dict[str, Any]:
    """Back from ``tokenizer.json`` to a spec: the byte tokenizer above, or any other BPE."""
    try:
        model = json.loads(text).get("model", {})
    except json.JSONDecodeError as err:
        raise HorizonError(f"{TOKENIZER_FILE} is not valid JSON ({err})") from err
    if model.get("type") != "BPE":
        raise HorizonError(f"{TOKENIZER_FILE} holds a {model.get('type')} tokenizer; byte-level or BPE expected")
    if not model.get("merges") and model.get("vocab") == {c: i for i, c in enumerate(byte_chars())}:
        return {"kind": "byte"}
    return {"kind": "bpe", "json": text}


def export_weights(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights under the wrapper's names, without the tied head (safetensors refuses
    shared storage; ``from_pretrained`` ties it back)."""
    weights = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        weights.pop("head.weight", None)
    return {WEIGHT_PREFIX + k: v.detach().cpu().contiguous() for k, v in weights.items()}


CARRIED_INFO = ("step", "tokens_seen", "train_seconds", "data", "data_meta_sha", "train_config")
"""What an export keeps of its checkpoint's info: where the model stands and the data it was
trained on (``horizon eval`` scores that data by default). Optimizer and carried state are dropped."""


def write_folder(folder: Path, model: nn.Module, tokenizer: dict[str, Any], info: dict[str, Any] | None = None) -> None:
    """Write the files of an exported model into an existing, empty ``folder``: the Hugging Face
    files, and a checkpoint.json over them holding ``info``'s ``CARRIED_INFO``."""
    kind = model_kind(model)
    if kind not in MODEL_TYPES:
        raise HorizonError(f"a {kind} model is a peer built on another library: it has no Hugging Face export here")
    tok_json = tokenizer_json(tokenizer)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config = {"model_type": MODEL_TYPES[kind], "architectures": [ARCHITECTURES[kind]], "dtype": dtype,
              **model.config.to_dict()}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(export_weights(model), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / TOKENIZER_FILE).write_text(tok_json)
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tok_config, indent=2) + "\n")
    carried = {k: v for k, v in (info or {}).items() if k in CARRIED_INFO}
    write_checkpoint_json(folder, model, [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE],
                          {**carried, "tokenizer": tokenizer, "weight_prefix": WEIGHT_PREFIX, "exported": True})


def export_folder(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the model of ``checkpoint`` (a checkpoint, run folder or export) to ``out``, built in a
    temporary folder beside it and renamed into place, so ``out`` is never half written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise HorizonError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise HorizonError(f"{out} exists and is not a folder")
    ckpt = load_any(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_folder(tmp, ckpt.model, ckpt.info.get("tokenizer", {"kind": "byte"}), ckpt.info)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_export(path: str | Path) -> bool:
    """A folder in the Hugging Face layout that is not also a checkpoint: ``model.safetensors`` or a
    ``config.json`` that names a ``model_type`` (or cannot be read, outside a run folder), and no
    ``checkpoint.json`` (``horizon export`` writes one, so its folders load as checkpoints). A
    training run's folder also holds a ``config.json`` (its settings, no ``model_type``) and is not
    an export."""
    path = Path(path)
    if (path / "checkpoint.json").is_file() or not (path / CONFIG_FILE).is_file():
        return False
    if (path / WEIGHTS_FILE).is_file():
        return True
    try:
        return "model_type" in json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return not (path / "checkpoints").is_dir()  # unreadable: an export's loader says why


def _model_config(folder: Path, kind: str, values: dict[str, Any]) -> dict[str, Any]:
    """The model's own fields of config.json; the rest is transformers' bookkeeping."""
    names = [f.name for f in dataclasses.fields(MODEL_KINDS[kind][1])]
    missing = [n for n in names if n not in values]
    if missing:
        raise HorizonError(f"{folder / CONFIG_FILE} lacks the {kind} config fields {', '.join(missing)} "
                           "(written by another version of horizonlm?)")
    return {n: values[n] for n in names}


def exported_info(path: str | Path) -> dict[str, Any]:
    """What a checkpoint's checkpoint.json would say of an exported folder (``kind``, ``config``,
    ``tokenizer``), read without loading the weights."""
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise HorizonError(f"no exported model at {folder} ({config_path} not found)")
    try:
        values = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HorizonError(f"{config_path} is not valid JSON ({err})") from err
    kinds = {v: k for k, v in MODEL_TYPES.items()}
    kind = kinds.get(values.get("model_type"))
    if kind is None:
        raise HorizonError(f"{folder} holds a model of type {values.get('model_type')!r}, not one of "
                           f"{sorted(kinds)}")
    config = _model_config(folder, kind, values)
    tok_path = folder / TOKENIZER_FILE
    if tok_path.is_file():
        tokenizer = spec_from_tokenizer_json(tok_path.read_text())
    elif config["vocab_size"] == 256:
        tokenizer = {"kind": "byte"}
    else:
        raise HorizonError(f"exported model {folder} has no {TOKENIZER_FILE} and {config['vocab_size']} tokens "
                           "(only a 256-token model is taken to be byte level)")
    return {"kind": kind, "config": config, "tokenizer": tokenizer, "format": "export"}


def load_exported(path: str | Path, expect_kind: str | None = None, expect_config: dict[str, Any] | None = None,
                  map_location: str = "cpu") -> Checkpoint:
    """Load an exported folder (or one written by ``save_pretrained``) as a :class:`Checkpoint`
    whose info is :func:`exported_info`. Every failure is a HorizonError."""
    folder = Path(path)
    info = exported_info(folder)
    kind, config = info["kind"], info["config"]
    if expect_kind is not None and kind != expect_kind:
        raise HorizonError(f"{folder} holds a {kind} model, not the requested {expect_kind}")
    if expect_config is not None and config != expect_config:
        differ = sorted(k for k in set(config) | set(expect_config) if config.get(k) != expect_config.get(k))
        raise HorizonError(f"{folder} does not match the requested model (fields {', '.join(differ)} differ)")
    model = build_model(kind, config)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise HorizonError(f"exported model {folder} has no {WEIGHTS_FILE}")
    try:
        stored = load_file(str(weights_path), device=map_location)
    except (SafetensorError, OSError) as err:
        raise HorizonError(f"exported model {folder}: cannot read {WEIGHTS_FILE} ({err})") from err
    weights = {k.removeprefix(WEIGHT_PREFIX): v for k, v in stored.items()}
    if getattr(model.config, "tie_embeddings", False) and "embed.weight" in weights:
        weights["head.weight"] = weights["embed.weight"]
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)[:2]
    except RuntimeError as err:  # a shape that differs
        raise HorizonError(f"exported model {folder}: weights do not fit its config ({err})") from err
    if missing or unexpected:
        raise HorizonError(f"exported model {folder}: weights do not fit its config (missing {missing}, "
                           f"unexpected {unexpected})")
    return Checkpoint(path=folder, model=model, info=info, train_tensors=None)


def load_any(path: str | Path, **kwargs: Any) -> Checkpoint:
    """An exported folder or a checkpoint (folder, run folder), whichever ``path`` is."""
    return load_exported(path, **kwargs) if is_export(path) else load_checkpoint(path, **kwargs)
