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


def _asked_value(y: torch.Tensor, w: torch.Tensor, weight: float) -> bytes:
    """The weighted targets are exactly the answer, " VALUE.", at the window's end."""
    answer = bytes(y[w == weight].tolist())
    assert answer.startswith(b" ") and answer.endswith(b".") and bytes(y.tolist()).endswith(answer)
    return answer[1:-1]


def test_retrieval_episodes_cross_windows() -> None:
    """same_window=0: the facts are stated in an earlier window of the episode and asked at the
    end of its last one, never in the benchmark's words."""
    from horizonlm.data.stream import RetrievalMix

    tokens = (np.arange(200_000) % 26 + 97).astype(np.uint8)
    mix = RetrievalMix(every=3, rate=1.0, seed=0, answer_weight=5.0)
    batcher = LongStreamBatcher(tokens, 2, 1024, retrieval=mix)
    for stream in range(2):
        earlier = b"".join(bytes(batcher.batch(i)[0][stream].tolist()) for i in (0, 1))
        x_last, y_last, w_last = batcher.batch(2)
        value = _asked_value(y_last[stream], w_last[stream], 5.0)
        question = bytes(y_last[stream].tolist())
        assert value in earlier and question.count(value) == 1  # stated before, only answered here
        assert (w_last[stream] != 5.0).sum() == 1024 - len(value) - 2
        assert b"pass key" not in earlier + question
    assert torch.equal(batcher.batch(2)[1], y_last)  # deterministic: the same step gives the same data


def test_retrieval_episodes_in_the_question_window_with_labelled_keys() -> None:
    """same_window=1: every fact is stated before the question in the last window, the question
    names the asked fact's label, and the weighted targets are exactly its value."""
    from horizonlm.data.episodes import LABELS
    from horizonlm.data.stream import RetrievalMix

    tokens = (np.arange(400_000) % 26 + 97).astype(np.uint8)
    mix = RetrievalMix(every=2, rate=1.0, seed=3, answer_weight=7.0, same_window=1.0, max_keys=4)
    batcher = LongStreamBatcher(tokens, 8, 1024, retrieval=mix)
    labels = [pattern.format(c=c).encode() for pattern, fillers in LABELS.values() for c in fillers]
    facts_seen = set()
    for b in range(8):
        assert b"pass key" not in bytes(batcher.batch(0)[0][b].tolist())
        _, y, w = batcher.batch(1)
        value = _asked_value(y[b], w[b], 7.0)
        text = bytes(y[b].tolist())
        question = text[text.rindex(b"  ") + 1 :] if b"  " in text else text  # after the last fact
        stated = text[: text.rindex(value)]
        assert value in stated
        asked = [label for label in labels if label in question and label in stated]
        assert asked, question
        facts_seen.add(sum(stated.count(label) > 0 for label in labels))
    assert len(facts_seen) > 1  # one to four facts


def test_retrieval_needs_room_in_the_window() -> None:
    from horizonlm.data.stream import RetrievalMix

    tokens = np.zeros(100_000, dtype=np.uint8)
    with pytest.raises(HorizonError, match="too short"):
        LongStreamBatcher(tokens, 2, 256, retrieval=RetrievalMix(every=2, rate=1.0, max_keys=4))
