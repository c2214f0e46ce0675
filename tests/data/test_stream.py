"""The long-stream window order: contiguous per stream, a pure function of the step."""

from __future__ import annotations

import numpy as np
import pytest

from horizonlm.data.stream import LongStreamBatcher
from horizonlm.errors import HorizonError


def test_windows_are_contiguous_per_stream() -> None:
    tokens = np.arange(1000) % 251
    batcher = LongStreamBatcher(tokens, batch_size=4, seq_len=16)
    x0, y0 = batcher.batch(0)
    x1, _ = batcher.batch(1)
    assert x0.shape == (4, 16)
    assert (y0[:, :-1] == x0[:, 1:]).all()  # targets are inputs shifted by one
    assert (x1[:, 0] == y0[:, -1]).all()  # the next window continues the stream
    assert x0[1, 0] == 250 % 251  # stream 1 starts a quarter of the way in


def test_ranks_take_disjoint_streams_of_one_batch() -> None:
    tokens = np.arange(4000) % 256
    full, _ = LongStreamBatcher(tokens, 4, 32).batch(3)
    rank1, _ = LongStreamBatcher(tokens, 4, 32, first_stream=2, local_batch=2).batch(3)
    assert (rank1 == full[2:]).all()


def test_epoch_wraps_and_too_little_data() -> None:
    batcher = LongStreamBatcher(np.arange(330), 2, 32)
    assert batcher.windows == 5 and batcher.starts_epoch(5) and not batcher.starts_epoch(4)
    assert (batcher.batch(5)[0] == batcher.batch(0)[0]).all()
    with pytest.raises(HorizonError, match="lower batch_size or seq_len"):
        LongStreamBatcher(np.arange(10), 2, 32)
