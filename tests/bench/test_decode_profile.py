"""``profile_decode`` on the CPU: both kinds of step are found and counted (the numbers are only
measured on a GPU, by ``horizon bench speed --parts decode_profile``)."""

from __future__ import annotations

import torch

from horizonlm.bench.decode_profile import profile_decode

from ..conftest import make_horizon


def test_profile_counts_replayed_and_chunk_end_steps() -> None:
    model = make_horizon(dtype=torch.float32).eval()
    chunk = model.config.chunk_size
    with torch.no_grad():
        state = model(torch.randint(0, 256, (1, 5)))[1]
        result = profile_decode(model, state, steps=2 * chunk, bf16=False)
    assert result["eager"]["steps"] == 2 and result["replay"]["steps"] == 2 * chunk - 2  # two chunk ends
    for kind in ("eager", "replay"):
        assert result[kind]["kernels_per_step"] > 0 and result[kind]["median_wall_ms"] > 0
    assert result["eager"]["counted"] == "outermost CPU operators"
