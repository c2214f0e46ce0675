"""Bad configuration and bad inputs raise a ValueError that names the field."""

from __future__ import annotations

import pytest
import torch

from horizonlm import HorizonConfig, HorizonLM, TransformerConfig, TransformerLM
from horizonlm.config import HORIZON_PRESETS, TRANSFORMER_MLP_HIDDEN

from .conftest import make_horizon, make_transformer


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(chunk_size=0), "chunk_size"),
        (dict(memory_topk=10, memory_capacity=5), "memory_topk"),
        (dict(ssm_state=7), "ssm_state"),
        (dict(d_model=-1), "d_model"),
        (dict(global_layer=9), "global_layer"),
        (dict(memory_tau=0.0), "memory_tau"),
        (dict(n_layers=True), "n_layers"),
        (dict(ssm_dt_min=0.5, ssm_dt_max=0.1), "ssm_dt_min"),
        (dict(ssm_kind="mamba"), "ssm_kind"),
        (dict(ssm_gate="glu"), "ssm_gate"),
        (dict(memory_kind="pair"), "memory_kind"),
        (dict(memory_key_span=0), "memory_key_span"),
        (dict(memory_layer=4), "memory_layer"),
        (dict(memory_layer=-1), "memory_layer"),
        (dict(memory_kind="chunk", memory_layer=1), "memory_layer"),
        (dict(ssm_chunk=100), "ssm_chunk"),
        (dict(ssm_chunk=2048), "ssm_chunk"),
        (dict(ssm_chunk=0), "ssm_chunk"),
        (dict(ssm_kind="selective", d_model=96, ssm_head_dim=64), "ssm_head_dim"),
    ],
)
def test_bad_horizon_config(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        HorizonConfig(**overrides)


def test_bad_transformer_config() -> None:
    with pytest.raises(ValueError, match="n_heads"):
        TransformerConfig(d_model=64, n_heads=5)


def test_unknown_preset_and_field() -> None:
    with pytest.raises(ValueError, match="preset"):
        HorizonConfig.preset("huge")
    with pytest.raises(ValueError, match="bogus"):
        HorizonConfig.from_dict({"bogus": 1})


def test_round_trip_dict() -> None:
    cfg = HorizonConfig.preset("small", use_memory=False)
    assert HorizonConfig.from_dict(cfg.to_dict()) == cfg


def test_state_from_other_batch_size() -> None:
    for model in (make_horizon(), make_transformer()):
        _, state = model(torch.zeros(2, 5, dtype=torch.long))
        with pytest.raises(ValueError, match="batch_size"):
            model(torch.zeros(3, 5, dtype=torch.long), state)


def test_state_from_other_model() -> None:
    _, state = make_horizon(use_memory=False)(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="use_supervisor/use_memory"):
        make_horizon()(torch.zeros(1, 5, dtype=torch.long), state)
    _, kv = make_transformer()(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="HorizonState"):
        make_horizon()(torch.zeros(1, 5, dtype=torch.long), kv)


@pytest.mark.parametrize("tokens", [torch.zeros(5, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long),
                                    torch.full((1, 3), 256), torch.full((1, 3), -1), torch.zeros(1, 3)])
def test_bad_tokens(tokens: torch.Tensor) -> None:
    for model in (HorizonLM(HorizonConfig.preset("tiny")), TransformerLM(TransformerConfig.preset("tiny"))):
        with pytest.raises(ValueError, match="tokens|token ids"):
            model(tokens)


def test_presets_sizes() -> None:
    """The base preset is roughly 100M parameters for both models (counted on the meta device)."""
    with torch.device("meta"):
        horizon = HorizonLM(HorizonConfig.preset("base")).num_parameters()
        transformer = TransformerLM(TransformerConfig.preset("base")).num_parameters()
    assert 80e6 < horizon < 130e6
    assert 80e6 < transformer < 130e6


def test_gated_presets_keep_their_parameters() -> None:
    """The gate and input projection are paid for by a narrower MLP: the gated base model has the
    parameters of the ungated block with the wider MLP, and the transformer at least as many."""
    with torch.device("meta"):
        gated = HorizonLM(HorizonConfig.preset("base")).num_parameters()
        ungated = HorizonLM(HorizonConfig.preset("base", ssm_gate="none", mlp_hidden=1536 + 256)).num_parameters()
        transformer = TransformerLM(TransformerConfig.preset("base")).num_parameters()
    assert abs(gated - ungated) / gated < 1e-3
    assert transformer >= gated


@pytest.mark.parametrize("preset", sorted(HORIZON_PRESETS))
def test_the_transformer_has_at_least_horizonlms_parameters(preset: str) -> None:
    """Equal-compute comparisons give the baseline no fewer parameters than the default model."""
    with torch.device("meta"):
        horizon = HorizonLM(HorizonConfig.preset(preset)).num_parameters()
        transformer = TransformerLM(TransformerConfig.preset(preset)).num_parameters()
        narrower = TransformerLM(TransformerConfig.preset(preset, mlp_hidden=TRANSFORMER_MLP_HIDDEN[preset] - 16))
    assert transformer >= horizon
    if preset != "base":  # the narrowest multiple of 16 that reaches HorizonLM
        assert narrower.num_parameters() < horizon


def test_config_of_the_earlier_block_is_refused_by_name() -> None:
    old = {**HorizonConfig.preset("tiny").to_dict(), "ssm_fft_chunk": 16}
    del old["ssm_chunk"]
    with pytest.raises(ValueError, match="earlier HorizonLM.*retrain"):
        HorizonConfig.from_dict(old)


@pytest.mark.parametrize("field", ["memory_write", "memory_tie_query", "memory_before_supervisor"])
def test_config_of_a_retired_memory_is_refused_by_name(field: str) -> None:
    old = {**HorizonConfig.preset("tiny").to_dict(), field: "pair" if field == "memory_write" else True}
    with pytest.raises(ValueError, match=f"earlier HorizonLM.*{field}.*retrain"):
        HorizonConfig.from_dict(old)
