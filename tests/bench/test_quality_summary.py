"""The quality table: seeds grouped, spreads, and gaps called real only beyond the seed spread."""

from __future__ import annotations

import pytest

from horizonlm.bench.quality_summary import format_quality_table, summarize_quality


def _entry(carried: float, seed: int = 0, ppl: float = 100.0) -> dict:
    return {"seed": seed, "steps": 10, "scores": {"novels_test_carried": {"bits_per_byte": carried},
                                                   "wt_ppl": {"word_perplexity": ppl}}}


def test_seeds_are_grouped_and_gaps_judged_against_their_spread() -> None:
    results = {"models": {
        "horizon": _entry(1.60), "horizon-seed1": _entry(1.62, seed=1),
        "transformer": _entry(1.70), "transformer-seed1": _entry(1.71, seed=1),
        "horizon_no_ssm": _entry(1.61), "horizon_no_ssm-seed2": _entry(1.64, seed=2),
        "gla": _entry(1.90, ppl=300.0),
    }}
    summary = summarize_quality(results)
    assert summary["main_score"] == "novels_test_carried"
    horizon = summary["models"]["horizon"]
    assert horizon["seeds"] == [0, 1] and horizon["scores"]["novels_test_carried"]["mean"] == pytest.approx(1.61)
    assert horizon["scores"]["novels_test_carried"]["spread"] == pytest.approx(0.02)
    assert summary["models"]["gla"]["scores"]["wt_ppl"]["mean"] == 300.0
    ranking = summary["ranking"]
    assert [r["model"] for r in ranking] == ["horizon", "horizon_no_ssm", "transformer", "gla"]
    assert ranking[0]["gap_to_next"] == pytest.approx(0.015) and ranking[0]["beyond_seed_spread"] is False
    assert ranking[1]["beyond_seed_spread"] is True  # 0.08 apart, spreads 0.03 and 0.01
    assert ranking[2]["beyond_seed_spread"] is None  # gla has one seed: no spread to judge by
    assert "gap_to_next" not in ranking[3]
    table = format_quality_table(summary)
    assert "| horizon | 2 | 1.610 | 0.020 | 0.015 | no |" in table
    assert "| transformer | 2 | 1.705 | 0.010 | 0.195 | one seed: unknown |" in table
    assert "| gla | 1 | 1.900 | - | - | - |" in table


def test_baselines_with_fewer_parameters_than_the_default_are_named() -> None:
    entries = {"horizon": 100, "horizon-seed1": 100, "horizon_no_memory": 90, "transformer": 110, "gla": 99,
               "gla-seed1": 101, "peer_unrecorded": None}
    results = {"models": {name: {**_entry(1.6), **({"parameters": n} if n else {})} for name, n in entries.items()}}
    summary = summarize_quality(results)
    assert summary["models"]["gla"]["parameters"] == [99, 101]
    assert summary["fewer_parameters_than_default"] == ["gla"]  # its 101 run would pass, its 99 run does not
    assert "not an equal comparison: gla" in format_quality_table(summary)
    del results["models"]["horizon"], results["models"]["horizon-seed1"]
    assert summarize_quality(results)["fewer_parameters_than_default"] == []  # no default to compare with


def test_nothing_to_rank() -> None:
    summary = summarize_quality({"models": {"x": {"scores": {"wt_ppl": {"word_perplexity": 5.0}}}}})
    assert summary["main_score"] is None and summary["ranking"] == []
    assert "no *_test_carried" in format_quality_table(summary)


def _cold(rows: list[list[float]]) -> dict:
    bins = [{"from": 1, "to": 2}, {"from": 2, "to": 5}]
    return {"by_position": bins, "by_start": rows}


def test_cold_starts_are_paired_start_by_start() -> None:
    """The difference of two models on the same starts, per bin, with the standard error of the
    per-start differences: a shared hard start cancels."""
    import numpy as np

    from horizonlm.bench.quality_summary import paired_bins

    a = [[5.0, 3.0], [9.0, 2.0], [4.0, 2.5]]
    b = [[4.5, 3.1], [8.4, 2.0], [3.6, 2.4]]
    got = paired_bins(_cold(a), _cold(b))
    diffs = np.array(a) - np.array(b)  # (starts, bins)
    assert [(r["from"], r["to"]) for r in got] == [(1, 2), (2, 5)]
    assert [r["difference"] for r in got] == pytest.approx(diffs.mean(axis=0).tolist())
    assert [r["stderr"] for r in got] == pytest.approx((diffs.std(axis=0, ddof=1) / np.sqrt(3)).tolist())
    results = {"models": {"horizon": {"scores": {"novels_test_cold_starts": _cold(b)}},
                          "horizon_chunk_memory": {"scores": {"novels_test_cold_starts": _cold(a)}},
                          "transformer": {"scores": {"novels_test_cold_starts": {"by_position": []}}}}}
    paired = summarize_quality(results)["cold_starts_paired"]
    assert list(paired) == ["horizon_chunk_memory - horizon"]  # the transformer recorded no starts
    assert paired["horizon_chunk_memory - horizon"] == got


def test_paired_bins_refuse_scores_that_do_not_pair() -> None:
    from horizonlm.bench.quality_summary import paired_bins

    with pytest.raises(ValueError, match="same starts"):
        paired_bins(_cold([[1.0, 1.0]]), _cold([[1.0, 1.0], [2.0, 2.0]]))
    with pytest.raises(ValueError, match="by_start"):
        paired_bins(_cold([[1.0, 1.0]]), {"by_position": _cold([])["by_position"]})
