"""Changing token j never changes logits (or layer outputs) at positions < j, and does change
them at j or later (so the check can fail)."""

from __future__ import annotations

import pytest
import torch

from horizonlm.layers.memory import RetrievalMemory
from horizonlm.layers.multires_conv import MultiResConv
from horizonlm.layers.ssm import SSMSublayer
from horizonlm.layers.supervisor import RecurrentSupervisor

from .conftest import make_horizon, make_transformer, tiny_config

LENGTH = 45  # several chunks of C=8, not a multiple of it
# Inside a chunk, first and last token of a chunk, and random positions.
POSITIONS = [0, 3, 7, 8, 15, 16, 23, 31, 44] + torch.randint(1, LENGTH, (4,), generator=torch.Generator().manual_seed(5)).tolist()


def _perturbed(tokens: torch.Tensor, j: int) -> torch.Tensor:
    changed = tokens.clone()
    changed[:, j] = (changed[:, j] + 1 + torch.arange(changed.shape[0])) % 256
    return changed


def _check(outputs: torch.Tensor, changed_outputs: torch.Tensor, j: int) -> None:
    before = (outputs[:, :j] - changed_outputs[:, :j]).abs().max().item() if j > 0 else 0.0
    assert before <= 1e-10, f"output before position {j} moved by {before}"
    after = (outputs[:, j:] - changed_outputs[:, j:]).abs().max().item()
    assert after > 1e-6, f"changing token {j} had no effect from {j} on"


MODELS = {
    "horizon": lambda: make_horizon(),
    "horizon_supervisor_only": lambda: make_horizon(use_memory=False, use_ssm=False, use_conv=False),
    "horizon_memory_only": lambda: make_horizon(use_supervisor=False, use_ssm=False, use_conv=False),
    "horizon_induction_memory_small": lambda: make_horizon(memory_capacity=4),
    "horizon_induction_memory_one_token": lambda: make_horizon(memory_capacity=4, memory_key_span=1),
    "horizon_induction_memory_after_block_0": lambda: make_horizon(memory_layer=1),
    "horizon_no_late_read": lambda: make_horizon(memory_late_read=False),
    "horizon_no_tau_growth": lambda: make_horizon(memory_tau_growth=False),
    "horizon_chunk_memory": lambda: make_horizon(memory_kind="chunk", memory_key_span=1),
    "horizon_chunk_memory_span": lambda: make_horizon(memory_kind="chunk", memory_key_span=3),
    "horizon_ssm_only": lambda: make_horizon(use_supervisor=False, use_memory=False, use_conv=False),
    "horizon_selective": lambda: make_horizon(ssm_kind="selective"),
    "horizon_ungated": lambda: make_horizon(ssm_gate="none"),
    "horizon_count_cache": lambda: make_horizon(count_lengths=(1, 2), count_capacity=16),
    "horizon_conv_only": lambda: make_horizon(use_supervisor=False, use_memory=False, use_ssm=False),
    "transformer": lambda: make_transformer(),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_is_causal(name: str) -> None:
    model = MODELS[name]()
    tokens = torch.randint(0, 256, (2, LENGTH), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits, _ = model(tokens)
        for j in POSITIONS:
            changed, _ = model(_perturbed(tokens, j))
            _check(logits, changed, j)


def _components():
    cfg = tiny_config()
    d = cfg.d_model
    return {
        "s4d": SSMSublayer(cfg),
        "s4d_ungated": SSMSublayer(tiny_config(ssm_gate="none")),
        "selective": SSMSublayer(tiny_config(ssm_kind="selective")),
        "multires_conv": MultiResConv(d, cfg.conv_kernel, cfg.conv_levels),
        "supervisor": RecurrentSupervisor(d, cfg.supervisor_dim, cfg.chunk_size, cfg.norm_eps),
        "memory": RetrievalMemory(d, cfg.memory_dim, cfg.chunk_size, cfg.memory_capacity, cfg.memory_topk,
                                  cfg.memory_tau, 16, cfg.norm_eps, key_span=cfg.memory_key_span),
        "memory_chunk": RetrievalMemory(d, cfg.memory_dim, cfg.chunk_size, 4, cfg.memory_topk, cfg.memory_tau, 16,
                                        cfg.norm_eps, kind="chunk"),
    }


@pytest.mark.parametrize("name", ["s4d", "s4d_ungated", "selective", "multires_conv", "supervisor", "memory",
                                  "memory_chunk"])
def test_component_is_causal(name: str) -> None:
    torch.manual_seed(3)
    layer = _components()[name].double()
    x = torch.randn(2, LENGTH, tiny_config().d_model, dtype=torch.float64)
    with torch.no_grad():
        y, _ = layer(x)
        for j in POSITIONS:
            changed = x.clone()
            changed[:, j] += torch.randn_like(changed[:, j])
            y_changed, _ = layer(changed)
            before = (y[:, :j] - y_changed[:, :j]).abs().max().item() if j > 0 else 0.0
            assert before <= 1e-10, f"{name}: output before {j} moved by {before}"
            # The supervisor and memory act only once a chunk completes: a change in the last
            # chunk may legitimately leave every output unchanged except the position itself.
            assert (y[:, j:] - y_changed[:, j:]).abs().max().item() > 1e-8
