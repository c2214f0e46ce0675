"""Offline, local files only: nothing here may reach a model or data set hub. Set before any test
module imports transformers, datasets or lm_eval, which read these at import."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from horizonlm import HorizonConfig, HorizonLM, TransformerConfig, TransformerLM
from horizonlm.checkpoint import save_checkpoint

from ..conftest import as_if_trained

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", str(Path(tempfile.gettempdir()) / "horizonlm-tests-hf-datasets"))

HERE = Path(__file__).parent


def tiny_model(kind: str = "horizon", seed: int = 0, **overrides) -> HorizonLM | TransformerLM:
    """Float32 (as trained and exported), tiny preset; the late read's W_o' and the tau growth's a,
    which start at zero, set as if trained, so the bridges carry those paths too."""
    torch.manual_seed(seed)
    if kind == "horizon":
        return as_if_trained(HorizonLM(HorizonConfig.preset("tiny", **overrides)))
    return TransformerLM(TransformerConfig.preset("tiny", **overrides))


def checkpoint_of(model, root: Path, tokenizer: dict | None = None) -> Path:
    """A run's checkpoints folder holding ``model``."""
    save_checkpoint(root, 1, model, {"tokenizer": tokenizer or {"kind": "byte"}})
    return root


@pytest.fixture(params=["horizon", "transformer"])
def kind(request) -> str:
    return request.param
