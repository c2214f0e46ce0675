"""Property tests: shapes, dtypes and lengths around the chunk size, split anywhere."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from horizonlm import HorizonConfig, HorizonLM

CFG = HorizonConfig.preset("tiny")
C = CFG.chunk_size
torch.manual_seed(0)
MODEL = HorizonLM(CFG).eval()
LENGTHS = st.sampled_from([1, C - 1, C, C + 1, 3 * C + 2, 5 * C])


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), length=LENGTHS, data=st.data())
def test_shapes_dtypes_and_any_split(batch: int, length: int, data) -> None:
    seed = data.draw(st.integers(0, 2**16))
    tokens = torch.randint(0, CFG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    cut = data.draw(st.integers(0, length))
    with torch.no_grad():
        logits, state = MODEL(tokens)
        assert logits.shape == (batch, length, CFG.vocab_size)
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
        assert state.pos == length and state.batch_size == batch
        assert state.blocks[0].ssm.shape == (batch, CFG.d_model, CFG.ssm_state // 2)
        assert state.blocks[0].ssm.dtype == torch.complex64
        assert state.memory.keys.shape[1] == min(length // C, CFG.memory_capacity)
        assert state.memory.chunk_ids.tolist() == list(range(length // C))[-CFG.memory_capacity :][: length // C]
        if 0 < cut < length:
            first, mid = MODEL(tokens[:, :cut])
            second, _ = MODEL(tokens[:, cut:], mid)
            joined = torch.cat([first, second], dim=1)
            assert ((joined - logits).norm() / logits.norm()).item() < 1e-5
