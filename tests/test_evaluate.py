"""Batched scoring: several streams per call score each stream exactly as it scores alone."""

from __future__ import annotations

import numpy as np
import pytest

from horizonlm.bench.quality import _score_books
from horizonlm.evaluate import evaluate_streams, evaluate_tokens
from tests.conftest import make_horizon, make_transformer


@pytest.mark.parametrize("make", [make_horizon, make_transformer], ids=["horizon", "transformer"])
def test_streams_in_one_batch_score_as_alone(make) -> None:
    """Ragged lengths (a shorter stream padded at its end), a window that does not divide them,
    more streams than a batch: every loss equals the stream's own evaluate_tokens in float64."""
    model = make()
    rng = np.random.default_rng(0)
    streams = [rng.integers(0, 256, n).astype(np.uint8) for n in (97, 40, 130, 2, 61)]
    batched = evaluate_streams(model, streams, window=32, device="cpu", batch=2)
    for stream, nats in zip(streams, batched):
        alone = evaluate_tokens(model, stream, 32, "cpu", progress=False, keep_per_token=True)["per_token_nats"]
        assert nats.shape == (len(stream) - 1,)
        np.testing.assert_allclose(nats, alone, rtol=1e-5, atol=1e-6)


def test_books_reset_every_window_score_as_the_reset_stream() -> None:
    """Reset windows scored as separate streams give the per-book totals of one stream reset every
    window; the carried books give those of each book streamed alone."""
    model = make_horizon()
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, 300).astype(np.uint8)
    documents = [["a", 0, 170], ["b", 170, 300]]
    bins = np.array([1, 10, 100, 200])
    for reset in (None, 32):
        got = _score_books(model, tokens, documents, 32, "cpu", reset, bins, batch=3)
        want = [evaluate_tokens(model, tokens[s:e], 32, "cpu", reset_every=reset, progress=False)
                for _, s, e in documents]
        assert got["tokens"] == sum(w["tokens"] for w in want) == 298
        total = sum(w["total_nats"] for w in want) / got["tokens"] / np.log(2)
        assert got["bits_per_byte"] == pytest.approx(total, rel=1e-6)


def test_streams_reject_a_bad_batch() -> None:
    with pytest.raises(ValueError, match="batch"):
        evaluate_streams(make_horizon(), [np.zeros(4, dtype=np.uint8)], window=8, device="cpu", batch=0)
