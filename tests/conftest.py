"""Shared fixtures: small float64 models so exactness checks are not blurred by rounding."""

from __future__ import annotations

import pytest
import torch

from horizonlm import HorizonConfig, HorizonLM, TransformerConfig, TransformerLM


def tiny_config(**overrides) -> HorizonConfig:
    return HorizonConfig.preset("tiny", **overrides)


def make_horizon(dtype=torch.float64, seed: int = 0, **overrides) -> HorizonLM:
    torch.manual_seed(seed)
    return HorizonLM(tiny_config(**overrides)).to(dtype)


def make_transformer(dtype=torch.float64, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(TransformerConfig.preset("tiny")).to(dtype)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
