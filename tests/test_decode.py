"""The decoder's bookkeeping equals plain stepping (on CPU every step is eager; the CUDA graph
path is checked against eager decoding on the GPU by `horizon bench speed`)."""

from __future__ import annotations

import torch

from horizonlm.decode import GraphedDecoder

from .conftest import make_horizon


def test_decoder_matches_model_steps() -> None:
    model = make_horizon(dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, state = model(tokens[:, :5])
        decoder = GraphedDecoder(model, state)
        expected_state = state
        for t in range(5, 30):
            got = decoder.step(tokens[:, t : t + 1])
            want, expected_state = model(tokens[:, t : t + 1], expected_state)
            torch.testing.assert_close(got, want[:, -1])
    snap = decoder.snapshot()
    assert snap.pos == expected_state.pos == 30
    torch.testing.assert_close(snap.memory.keys, expected_state.memory.keys)
