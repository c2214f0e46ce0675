"""The long-stream window order: contiguous per stream, a pure function of the step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from horizonlm.data.stream import LongStreamBatcher
from horizonlm.errors import HorizonError


def test_windows_are_contiguous_per_stream() -> None:
    tokens = np.arange(1000) % 251
    batcher = LongStreamBatcher(tokens, batch_size=4, seq_len=16)
    x0, y0, w0 = batcher.batch(0)
    x1, _, _ = batcher.batch(1)
    assert w0 is None
    assert x0.shape == (4, 16)
    assert (y0[:, :-1] == x0[:, 1:]).all()  # targets are inputs shifted by one
    assert (x1[:, 0] == y0[:, -1]).all()  # the next window continues the stream
    assert x0[1, 0] == 250 % 251  # stream 1 starts a quarter of the way in


def test_ranks_take_disjoint_streams_of_one_batch() -> None:
    tokens = np.arange(4000) % 256
    full = LongStreamBatcher(tokens, 4, 32).batch(3)[0]
    rank1 = LongStreamBatcher(tokens, 4, 32, first_stream=2, local_batch=2).batch(3)[0]
    assert (rank1 == full[2:]).all()


def test_epoch_wraps_and_too_little_data() -> None:
    batcher = LongStreamBatcher(np.arange(330), 2, 32)
    assert batcher.windows == 5 and batcher.starts_epoch(5) and not batcher.starts_epoch(4)
    assert (batcher.batch(5)[0] == batcher.batch(0)[0]).all()
    with pytest.raises(HorizonError, match="lower batch_size or seq_len"):
        LongStreamBatcher(np.arange(10), 2, 32)


def test_retrieval_episodes_cross_windows() -> None:
    """The key is stated in an episode's first window and asked at the end of its last one."""
    import re

    from horizonlm.data.stream import RetrievalMix

    tokens = (np.arange(200_000) % 26 + 97).astype(np.uint8)
    mix = RetrievalMix(every=3, rate=1.0, seed=0, answer_weight=5.0)
    batcher = LongStreamBatcher(tokens, 2, 256, retrieval=mix)
    first = bytes(batcher.batch(0)[0][0].tolist())
    middle = bytes(batcher.batch(1)[0][0].tolist())
    x_last, y_last, w_last = batcher.batch(2)
    stated = re.search(rb"The pass key is (\d{5})\.", first).group(1)
    assert b"pass key" not in middle
    asked = bytes(y_last[0].tolist())
    assert asked.endswith(b"The pass key is " + stated + b".")
    assert bytes(y_last[0][w_last[0] == 5.0].tolist()) == b" " + stated + b"."
    assert (w_last[0] != 5.0).sum() == 256 - 7
    # deterministic: the same step gives the same data
    assert torch.equal(batcher.batch(2)[1], y_last)


def test_retrieval_episodes_in_the_question_window_with_labelled_keys() -> None:
    """same_window=1: every labelled key is stated before the question in the last window, the
    question names one of them, and the weighted targets are exactly its answer."""
    import re

    from horizonlm.data.stream import RetrievalMix

    tokens = (np.arange(400_000) % 26 + 97).astype(np.uint8)
    mix = RetrievalMix(every=2, rate=1.0, seed=3, answer_weight=7.0, same_window=1.0, max_keys=4)
    batcher = LongStreamBatcher(tokens, 8, 1024, retrieval=mix)
    seen_counts = set()
    for b in range(8):
        assert b"pass key" not in bytes(batcher.batch(0)[0][b].tolist())
        _, y, w = batcher.batch(1)
        text = bytes(y[b].tolist())
        door = re.search(rb"What is the pass key(?: for the (\w+) door)?\? The pass key(?: for the \w+ door)? is (\d{5})\.$",
                         text)
        assert door is not None, text[-120:]
        facts = dict(re.findall(rb"The pass key(?: for the (\w+) door)? is (\d{5})\. Remember it\.", text))
        seen_counts.add(len(facts))
        assert facts[door.group(1) or b""] == door.group(2)
        assert bytes(y[b][w[b] == 7.0].tolist()) == b" " + door.group(2) + b"."
    assert len(seen_counts) > 1  # one to four keys


def test_retrieval_needs_room_in_the_window() -> None:
    from horizonlm.data.stream import RetrievalMix

    tokens = np.zeros(100_000, dtype=np.uint8)
    with pytest.raises(HorizonError, match="too short"):
        LongStreamBatcher(tokens, 2, 256, retrieval=RetrievalMix(every=2, rate=1.0, max_keys=4))
