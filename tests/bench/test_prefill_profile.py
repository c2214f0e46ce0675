"""The prefill profile's module map (its timing needs CUDA and runs in the benchmark)."""

from __future__ import annotations

from horizonlm.bench.prefill_profile import timed_modules

from ..conftest import make_horizon


def test_every_block_sublayer_and_model_part_is_timed_once() -> None:
    model = make_horizon()
    named = timed_modules(model)
    n_blocks = len(model.blocks)
    for name in ("block.ssm", "block.conv", "block.mlp", "block.ssm_norm"):
        assert len(named[name]) == n_blocks
    for name in ("embed", "memory", "supervisor", "final_norm", "head"):
        assert named[name] == [getattr(model, name)]
    timed = [id(m) for modules in named.values() for m in modules]
    assert len(timed) == len(set(timed))
    assert "blocks" not in named
