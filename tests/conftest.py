"""Shared fixtures: small float64 models so exactness checks are not blurred by rounding."""

from __future__ import annotations

import json

import pytest
import torch

from horizonlm import HorizonConfig, HorizonLM, TransformerConfig, TransformerLM
from horizonlm.checkpoint import load_checkpoint, save_checkpoint


def tiny_config(**overrides) -> HorizonConfig:
    return HorizonConfig.preset("tiny", **overrides)


def make_horizon(dtype=torch.float64, seed: int = 0, as_initialised: bool = False, **overrides) -> HorizonLM:
    """The tiny preset with random weights; the late read's W_o' random too and the tau growth's a
    nonzero (both start at zero, which would leave those paths out of every check), unless
    ``as_initialised``."""
    torch.manual_seed(seed)
    model = HorizonLM(tiny_config(**overrides))
    if not as_initialised:
        as_if_trained(model)
    return model.to(dtype)


def as_if_trained(model: HorizonLM) -> HorizonLM:
    """Give the parts that start as a no-op (the late read's W_o', the tau growth's a) values a
    trained model has, so the checks cover them."""
    with torch.no_grad():
        if model.late_read is not None:
            torch.nn.init.normal_(model.late_read.out.weight, std=0.5)
        if model.memory is not None and model.memory.tau_growth is not None:
            model.memory.tau_growth.fill_(0.3)
    return model


def saved_before_the_field(model: HorizonLM, field: str, root) -> HorizonLM:
    """``model`` saved as a checkpoint whose config lacks ``field`` (as one saved before the field
    existed), then loaded back in float64."""
    path = save_checkpoint(root, 1, model, {})
    meta_path = next(p for p in path.glob("*.json") if field in p.read_text())
    meta = json.loads(meta_path.read_text())
    del meta["config"][field]
    meta_path.write_text(json.dumps(meta))
    return load_checkpoint(path).model.to(torch.float64)


def make_transformer(dtype=torch.float64, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(TransformerConfig.preset("tiny")).to(dtype)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
