"""Shared fixtures: small float64 models so exactness checks are not blurred by rounding."""

from __future__ import annotations

import pytest
import torch

from horizonlm import HorizonConfig, HorizonLM, TransformerConfig, TransformerLM


def tiny_config(**overrides) -> HorizonConfig:
    return HorizonConfig.preset("tiny", **overrides)


def make_horizon(dtype=torch.float64, seed: int = 0, as_initialised: bool = False, **overrides) -> HorizonLM:
    """The tiny preset with random weights; the late read's W_o' random too (it starts at zero, which
    would leave that path out of every check), unless ``as_initialised``."""
    torch.manual_seed(seed)
    model = HorizonLM(tiny_config(**overrides))
    if model.late_read is not None and not as_initialised:
        torch.nn.init.normal_(model.late_read.out.weight, std=0.5)
    return model.to(dtype)


def make_transformer(dtype=torch.float64, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(TransformerConfig.preset("tiny")).to(dtype)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
