"""The quality benchmark's plumbing on a tiny budget: sweep, training, every score, the files."""

from __future__ import annotations

import json
from pathlib import Path

from horizonlm.cli import main
from horizonlm.data.prepare import prepare


def test_quality_bench_end_to_end(tmp_path: Path) -> None:
    prepare("shakespeare", tmp_path / "data")
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" = Title = \n Some raw text here . \n" * 40)
    tokens = tmp_path / "wiki.test.tokens"
    tokens.write_text(" = Title = \n Some <unk> text here . \n" * 40)
    out = tmp_path / "quality.json"
    assert main(["bench", "quality", "--data", str(tmp_path / "data"), "--wikitext-raw", str(raw),
                 "--wikitext-tokens", str(tokens), "--models", "horizon,horizon_no_memory,transformer",
                 "--preset", "tiny", "--minutes", "0.01", "--lrs", "0.003,0.01", "--sweep-minutes", "0.005",
                 "--batch-size", "2", "--seq-len", "32", "--eval-window", "64", "--max-eval-tokens", "2000",
                 "--runs", str(tmp_path / "runs"), "--out", str(out), "--device", "cpu"]) == 0
    results = json.loads(out.read_text())
    assert set(results["models"]) == {"horizon", "horizon_no_memory", "transformer"}
    horizon = results["models"]["horizon"]
    assert [s["lr"] for s in horizon["sweep"]] == [0.003, 0.01]
    assert set(horizon["scores"]) == {"novels_test_carried", "novels_test_reset_each_window", "wikitext_raw_test",
                                      "wikitext103_test_word_ppl_out_of_domain"}
    assert "novels_test_reset_each_window" not in results["models"]["transformer"]["scores"]
    assert results["models"]["horizon_no_memory"]["parameters"] < horizon["parameters"]
    assert horizon["scores"]["novels_test_carried"]["tokens"] == 1999
    assert horizon["scores"]["wikitext103_test_word_ppl_out_of_domain"]["words"] == 40 * (3 + 1 + 5 + 1)
    assert out.with_suffix(".png").is_file()
