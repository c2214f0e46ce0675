"""The far n-gram cache of ``horizon bench headroom``: counts against a direct search, the
held-out mixture, and the command end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from horizonlm.bench.headroom import (COUNT_BUCKETS, HeadroomConfig, analyse, bucket, check_far_cache, far_cache,
                                      far_cache_reference, fit_weight, kgram_hashes)
from horizonlm.checkpoint import save_checkpoint
from horizonlm.cli import main
from horizonlm.data.prepare import prepare
from horizonlm.errors import HorizonError
from tests.conftest import make_horizon


def _text(seed: int, n: int, alphabet: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(97, 97 + alphabet, n).astype(np.uint8)  # (N,)


def test_kgram_hashes_name_the_bytes_before_each_position() -> None:
    x = _text(0, 400, 2)  # (N,): two letters, so 8-grams repeat often
    for k in (8, 12, 24):
        h = kgram_hashes(x, k)  # (N + 1,)
        grams = {}
        for j in range(k, len(x) + 1):
            grams.setdefault(x[j - k : j].tobytes(), set()).add(int(h[j]))
        assert all(len(v) == 1 for v in grams.values())  # equal k-grams hash alike
        assert len({next(iter(v)) for v in grams.values()}) == len(grams)  # different ones differ here
        assert (h[:k] == 0).all()


@pytest.mark.parametrize("window,reach", [(64, None), (64, 300), (256, None), (200, 500)])
def test_far_cache_matches_a_direct_search(window: int, reach: int | None) -> None:
    x = np.concatenate([_text(1, 900, 3), np.frombuffer(b"the cat sat on the mat. " * 20, np.uint8)])  # (N,)
    assert check_far_cache(x, window, reach, positions=60, seed=2) == 0
    got = far_cache(x, [(window, reach)])[(window, reach)]
    j = len(x) - 5  # deep in the repeated sentence: long contexts, many of them far back
    assert (int(got["k"][j - 1]), int(got["total"][j - 1]), int(got["same"][j - 1]),
            bool(got["near"][j - 1])) == far_cache_reference(x, j, window, reach)
    assert got["k"][j - 1] == 64 and got["same"][j - 1] == got["total"][j - 1] > 0


def test_fit_weight_trusts_a_cache_only_as_far_as_it_is_right() -> None:
    loss = np.full(1000, math.log(256))  # a model that knows nothing
    assert fit_weight(loss, np.ones(1000)) > 0.99
    assert fit_weight(loss, np.zeros(1000)) == 0.0
    assert fit_weight(np.full(1000, 0.01), np.full(1000, 0.5)) < 0.05  # the model is already sure and right


def test_the_cache_pays_where_a_book_repeats_itself_and_nowhere_else() -> None:
    books = []
    for seed in range(3):
        block = _text(10 + seed, 3000, 256)  # (3000,)
        books.append(np.concatenate([block, _text(20 + seed, 5000, 256), block]))  # (11000,)
    feats = [far_cache(b, [(1024, None)])[(1024, None)] for b in books]
    uniform = {mode: [np.full(len(b) - 1, math.log(256), np.float32) for b in books] for mode in ("carried", "reset")}
    result = analyse(feats, uniform)
    share = 3000 / 11000  # the second copy, past its first 8 bytes
    assert abs(result["far_context_share"] - share) < 0.01
    # knowing nothing, the mixture gains nearly all 8 bits on the repeated share of the bytes
    assert result["carried"]["cache_mixture_gain"] > 0.9 * 8 * share
    assert result["carried_minus_reset"]["all"] == 0.0
    parts = {row["context_length"]: row["carried_cache_gain_part"] for row in result["by_context_length"]}
    assert sum(parts.values()) == pytest.approx(result["carried"]["cache_mixture_gain"])
    assert parts[64] > 0.9 * result["carried"]["cache_mixture_gain"]  # the copy's bytes past its 64th
    noise = [_text(30 + seed, 6000, 256) for seed in range(3)]  # no 8 bytes repeat in random bytes
    result = analyse([far_cache(b, [(1024, None)])[(1024, None)] for b in noise],
                     {mode: [np.full(len(b) - 1, math.log(256), np.float32) for b in noise] for mode in ("carried", "reset")})
    assert result["far_context_share"] == 0.0 and abs(result["carried"]["cache_mixture_gain"]) < 1e-5


@pytest.mark.parametrize("lengths", [(2, 3, 5), (1, 4, 6, 64)])
def test_far_cache_with_other_lengths_matches_a_direct_search(lengths: tuple[int, ...]) -> None:
    """Shorter contexts than the default's (the count cache's question: would they add?)."""
    x = np.concatenate([_text(3, 700, 4), np.frombuffer(b"a rose is a rose. " * 12, np.uint8)])  # (N,)
    assert check_far_cache(x, 64, None, positions=60, seed=4, lengths=lengths) == 0
    got = far_cache(x, [(64, None)], lengths)[(64, None)]
    assert set(np.unique(got["k"])) <= {0, *lengths} and (got["k"] == lengths[0]).any()
    buckets = bucket(got, lengths)  # (N-1,)
    assert buckets.max() < len(lengths) * COUNT_BUCKETS * 2


def test_config_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="lengths"):
        HeadroomConfig(lengths="8,4")
    with pytest.raises(ValueError, match="lengths"):
        HeadroomConfig(lengths="0,8")
    with pytest.raises(ValueError, match="windows"):
        HeadroomConfig(windows="1024,x")
    with pytest.raises(ValueError, match="reaches"):
        HeadroomConfig(reaches="4096,all")
    with pytest.raises(ValueError, match="eval_window"):
        HeadroomConfig(eval_window=0)


def _two_books(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    prepare("shakespeare", data)
    meta = json.loads((data / "meta.json").read_text())
    n = meta["splits"]["test"]["tokens"]
    meta["documents"] = {"test": [["first", 0, n // 2], ["second", n // 2, n]]}
    (data / "meta.json").write_text(json.dumps(meta))
    return data


def test_bench_headroom_end_to_end(tmp_path: Path) -> None:
    data = _two_books(tmp_path)
    save_checkpoint(tmp_path / "ckpt", 1, make_horizon(), {})
    save_checkpoint(tmp_path / "counts", 1, make_horizon(count_lengths=(2, 4)), {})
    out = tmp_path / "headroom.json"
    args = ["bench", "headroom", "--data", str(data), "--checkpoints", f"{tmp_path / 'ckpt'},{tmp_path / 'counts'}",
            "--windows", "256",
            "--reaches", "1024,book", "--eval-window", "128", "--max-bytes", "3000", "--check-positions", "20",
            "--loss-cache", str(tmp_path / "losses"), "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["books"] == ["first", "second"] and result["bytes"] == 2 * 2999
    assert result["reference_check"]["disagreed"] == 0
    entry = result["windows"]["256"]["checkpoints"][str(tmp_path / "ckpt")]
    assert set(entry) == {"1024", "book"}
    assert entry["book"]["carried"]["bits_per_byte"] > 0 and "cache_mixture_gain" in entry["book"]["reset"]
    positions = result["windows"]["256"]["by_position"]
    first, second = positions[str(tmp_path / "ckpt")], positions[str(tmp_path / "counts")]
    assert set(first) == {"carried_over_reset"} and set(second) == {"carried_over_reset", "carried_over_first",
                                                                      "reset_over_first"}
    assert sum(row["bytes"] for row in second["carried_over_first"]) == 2 * 2999
    assert out.with_suffix(".png").is_file()
    assert len(list((tmp_path / "losses").glob("*.npz"))) == 4  # carried and reset of each, kept for the next call
    before = out.read_text()
    assert main(args) == 2 and out.read_text() == before  # the file is there: refused without --overwrite
    assert main(args + ["--overwrite"]) == 0
    assert json.loads(out.read_text())["windows"]["256"]["checkpoints"] == result["windows"]["256"]["checkpoints"]


def test_bench_headroom_refuses_one_book_and_a_missing_checkpoint(tmp_path: Path) -> None:
    data = tmp_path / "data"
    prepare("shakespeare", data)
    with pytest.raises(HorizonError, match="at least two"):
        from horizonlm.bench.headroom import run_headroom

        run_headroom(HeadroomConfig(data=str(data), out=str(tmp_path / "h.json"), max_bytes=2000))
    with pytest.raises(HorizonError):
        run_headroom(HeadroomConfig(data=str(_two_books(tmp_path / "two")), out=str(tmp_path / "h.json"),
                                    checkpoints=str(tmp_path / "missing")))
    assert not (tmp_path / "h.json").exists()


def test_plot_orders_reaches_by_distance_when_read_back_sorted_as_text() -> None:
    """A results file read back from JSON can hold its reaches sorted as text ("16384" < "524288" <
    "65536"): the figure's axis still runs nearest first, the whole book last."""
    from horizonlm.bench.headroom_plot import _by_reach

    assert _by_reach({"16384": 0, "524288": 0, "65536": 0, "book": 0}) == ["16384", "65536", "524288", "book"]
    assert _by_reach({"book": 0, "4096": 0}) == ["4096", "book"]
