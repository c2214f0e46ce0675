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


def _answers(y: torch.Tensor, w: torch.Tensor, weight: float) -> list[bytes]:
    """The weighted targets are runs " VALUE." (one per fact asked), the last at the window's end."""
    text, marked = bytes(y.tolist()), (w == weight).tolist()
    runs, start = [], None
    for i, on in enumerate(marked + [False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append(text[start:i])
            start = None
    assert runs and text.endswith(runs[-1])
    assert all(run.startswith(b" ") and run.endswith(b".") for run in runs), runs
    return [run[1:-1] for run in runs]


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
        [value] = _answers(y_last[stream], w_last[stream], 5.0)  # one fact, asked once
        question = bytes(y_last[stream].tolist())
        assert value in earlier and question.count(value) == 1  # stated before, only answered here
        assert (w_last[stream] != 5.0).sum() == 1024 - len(value) - 2
        assert b"pass key" not in earlier + question
    assert torch.equal(batcher.batch(2)[1], y_last)  # deterministic: the same step gives the same data


def test_retrieval_episodes_in_the_question_window_ask_every_labelled_fact() -> None:
    """same_window=1: every fact is stated before the questions in the last window; each fact is
    asked once, by a question naming its label, and the weighted targets are exactly the values."""
    from horizonlm.data.episodes import LABELS
    from horizonlm.data.stream import RetrievalMix

    tokens = (np.arange(400_000) % 26 + 97).astype(np.uint8)
    mix = RetrievalMix(every=2, rate=1.0, seed=3, answer_weight=7.0, same_window=1.0, max_keys=4)
    batcher = LongStreamBatcher(tokens, 8, 2048, retrieval=mix)
    labels = [pattern.format(c=c).encode() for pattern, fillers in LABELS.values() for c in fillers]
    counts = set()
    for b in range(8):
        assert b"pass key" not in bytes(batcher.batch(0)[0][b].tolist())
        _, y, w = batcher.batch(1)
        values = _answers(y[b], w[b], 7.0)
        text = bytes(y[b].tolist()).lower()  # a fact may open its sentence with the label or the value
        assert len(set(values)) == len(values)
        assert all(text.count(v.lower()) == 2 for v in values)  # stated once, answered once (the weighted run)
        named = [label for label in labels if text.count(label.lower()) >= 2]  # stated and asked
        assert len(named) == len(values) and not [label for label in labels if text.count(label.lower()) == 1]
        counts.add(len(values))
    assert len(counts) > 1  # one to four facts


def test_cloze_questions_change_the_questions_only() -> None:
    """retrieval_cloze=1 (drawn from a seed of its own): the same facts stand at the same places
    and are answered with the same values; only the questions differ, and most now repeat the
    16 bytes before the value (:func:`horizonlm.data.episodes.cloze` is checked in test_episodes)."""
    from horizonlm.data.stream import RetrievalMix

    tokens = (np.arange(400_000) % 26 + 97).astype(np.uint8)
    batchers = [LongStreamBatcher(tokens, 8, 2048, retrieval=RetrievalMix(every=2, rate=1.0, seed=5, answer_weight=7.0,
                                                                           max_keys=2, cloze=share))
                for share in (0.0, 1.0)]
    (plain_first, _, _), (cloze_first, _, _) = (b.batch(0) for b in batchers)
    assert torch.equal(plain_first, cloze_first)  # the facts' window, unchanged
    (_, plain_y, plain_w), (_, cloze_y, cloze_w) = (b.batch(1) for b in batchers)
    repeated, asked = [0, 0], 0
    for b in range(8):
        values = _answers(cloze_y[b], cloze_w[b], 7.0)
        assert values == _answers(plain_y[b], plain_w[b], 7.0)
        stated = bytes(plain_first[b].tolist())
        for value in values:
            before = stated[: stated.index(b" " + value) + 1]
            for i, y in enumerate((plain_y, cloze_y)):
                text = bytes(y[b].tolist())
                repeated[i] += before[-16:] == text[: text.index(b" " + value + b".") + 1][-16:]
            asked += 1
    assert asked >= 8 and repeated[1] >= asked * 2 // 3 and repeated[0] <= asked // 3


def test_retrieval_needs_room_in_the_window() -> None:
    from horizonlm.data.stream import RetrievalMix

    tokens = np.zeros(100_000, dtype=np.uint8)
    with pytest.raises(HorizonError, match="too short"):
        LongStreamBatcher(tokens, 2, 256, retrieval=RetrievalMix(every=2, rate=1.0, max_keys=4))
