"""The quality benchmark's plumbing on a tiny budget: sweep, training, every score, the files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from horizonlm.bench.quality import (ABLATIONS, STEP_MARGIN, QualityConfig, _fill_steps, _moving_mean, _overrides,
                                     _step_seconds, plot_quality, run_quality)
from horizonlm.checkpoint import load_checkpoint
from horizonlm.cli import main
from horizonlm.config import HorizonConfig
from horizonlm.model import HorizonLM
from horizonlm.data.prepare import prepare
from horizonlm.errors import HorizonError
from horizonlm.train import TrainConfig


def test_quality_bench_end_to_end(tmp_path: Path) -> None:
    prepare("shakespeare", tmp_path / "data")
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" = Title = \n Some raw text here . \n" * 40)
    tokens = tmp_path / "wiki.test.tokens"
    tokens.write_text(" = Title = \n Some <unk> text here . \n" * 40)
    out = tmp_path / "quality.json"
    assert main(["bench", "quality", "--data", str(tmp_path / "data"), "--wikitext-raw", str(raw),
                 "--wikitext-tokens", str(tokens), "--models", "horizon,horizon_no_memory,transformer",
                 "--preset", "tiny", "--minutes", "0.02", "--lrs", "0.003,0.01", "--sweep-minutes", "0.005",
                 "--batch-size", "2", "--seq-len", "32", "--eval-window", "64", "--max-eval-tokens", "2000",
                 "--cold-starts", "3", "--cold-length", "100", "--score-memory-capacity", "40",
                 "--runs", str(tmp_path / "runs"), "--out", str(out), "--device", "cpu"]) == 0
    results = json.loads(out.read_text())
    assert set(results["models"]) == {"horizon", "horizon_no_memory", "transformer"}
    horizon = results["models"]["horizon"]
    assert [s["lr"] for s in horizon["sweep"]] == [0.003, 0.01]
    # the scores are named after the corpus trained on (here the shipped Shakespeare, not the novels)
    assert set(horizon["scores"]) == {"shakespeare_test_carried", "shakespeare_test_reset_each_window",
                                      "wikitext_raw_test", "wikitext103_test_word_ppl_out_of_domain",
                                      "shakespeare_test_cold_starts", "shakespeare_test_carried_memory_40"}
    longer = horizon["scores"]["shakespeare_test_carried_memory_40"]  # asked with 40 chunks, trained with 6
    assert longer["memory_capacity"] == 40 and longer["trained_memory_capacity"] == 6
    assert longer["tokens"] == 1999 and longer["bits_per_byte"] != horizon["scores"]["shakespeare_test_carried"]["bits_per_byte"]
    assert "shakespeare_test_carried_memory_40" not in results["models"]["horizon_no_memory"]["scores"]
    cold = horizon["scores"]["shakespeare_test_cold_starts"]
    assert cold["tokens"] == 300 and cold["starts"] == 3 and cold["by_position"][0]["from"] == 1
    assert "shakespeare_test_reset_each_window" not in results["models"]["transformer"]["scores"]
    assert results["models"]["horizon_no_memory"]["parameters"] < horizon["parameters"]
    # each entry says what its name meant when it ran
    assert results["models"]["horizon_no_memory"]["model_overrides"] == {"use_memory": False}
    assert horizon["model_overrides"] == {} and horizon["model_config"]["d_model"] == 32
    assert isinstance(horizon["memory_read"]["tau_growth"], float) and horizon["memory_read"]["tau"] == 10.0
    assert results["models"]["horizon_no_memory"]["memory_read"] is None
    assert horizon["scores"]["shakespeare_test_carried"]["tokens"] == 1999
    curve = horizon["valid_curve"]  # validation loss against training seconds, spread over the main run
    assert len(curve) >= 2 and all(a[0] < b[0] for a, b in zip(curve, curve[1:])) and curve[-1][1] < 8, curve
    assert horizon["scores"]["wikitext103_test_word_ppl_out_of_domain"]["words"] == 40 * (3 + 1 + 5 + 1)
    assert out.with_suffix(".png").is_file()
    # runs never resumed keep no stream state in their checkpoints (a long memory's is gigabytes)
    ckpt = load_checkpoint(tmp_path / "runs" / "horizon", with_train_state=True)
    assert ckpt.info["train_config"]["save_streams"] is False
    assert not any(k.startswith("state") for k in ckpt.train_tensors)


def test_quality_runs_in_worker_processes_and_adds_to_earlier_results(tmp_path: Path) -> None:
    """Two worker processes; ablations borrow the full model's swept rate; a second call keeps
    the first call's models and adds its own at the rate the first call chose."""
    prepare("shakespeare", tmp_path / "data")
    out = tmp_path / "quality.json"
    common = ["--data", str(tmp_path / "data"), "--wikitext-raw", "", "--wikitext-tokens", "", "--preset", "tiny",
              "--minutes", "0.005", "--sweep-minutes", "0.005", "--batch-size", "2", "--seq-len", "32",
              "--eval-window", "64", "--max-eval-tokens", "500", "--runs", str(tmp_path / "runs"), "--out", str(out),
              "--device", "cpu", "--ablation-lr-from-horizon"]
    assert main(["bench", "quality", *common, "--models", "horizon,horizon_no_conv", "--lrs", "0.003,0.01",
                 "--workers", "2"]) == 0
    first = json.loads(out.read_text())["models"]
    assert [s["lr"] for s in first["horizon"]["sweep"]] == [0.003, 0.01]
    assert first["horizon_no_conv"]["sweep"] == [] and first["horizon_no_conv"]["lr_from"] == "horizon's sweep"
    assert first["horizon_no_conv"]["lr"] == first["horizon"]["lr"]
    assert main(["bench", "quality", *common, "--models", "horizon_no_memory", "--lrs", "0.003,0.01"]) == 0
    second = json.loads(out.read_text())["models"]
    assert set(second) == {"horizon", "horizon_no_conv", "horizon_no_memory"}
    assert second["horizon"] == first["horizon"]
    assert second["horizon"]["settings"]["lrs"] == "0.003,0.01" and second["horizon"]["settings"]["workers"] == 2
    assert second["horizon_no_memory"]["settings"]["workers"] == 1  # each entry keeps its own call's settings
    assert second["horizon_no_memory"]["lr"] == first["horizon"]["lr"]
    before = out.read_bytes()
    assert main(["bench", "quality", *common, "--models", "horizon", "--lrs", "0.003,0.01",
                 "--runs", str(tmp_path / "runs-again")]) == 2
    assert out.read_bytes() == before  # a model already measured is not replaced without --replace


def test_quality_rejects_borrowing_without_the_full_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ablation_lr_from_horizon"):
        run_quality(QualityConfig(models="horizon_no_ssm", ablation_lr_from_horizon=True, lrs="0.001,0.002",
                                  out=str(tmp_path / "q.json"), runs=str(tmp_path / "runs")))
    with pytest.raises(ValueError, match="workers"):
        QualityConfig(workers=0)


@pytest.mark.parametrize("name", sorted(n for n, (kind, _) in ABLATIONS.items() if kind == "horizon"))
def test_every_ablation_builds_a_model_that_runs(name: str) -> None:
    """A misspelt field or an invalid value in an ABLATIONS entry fails here, not on a GPU."""
    config = HorizonConfig.preset("tiny", **_overrides(name, "tiny"))
    model = HorizonLM(config)
    logits, _ = model(torch.zeros(1, 12, dtype=torch.long))  # (1, 12, V)
    assert logits.shape == (1, 12, config.vocab_size) and torch.isfinite(logits).all()


def test_cold_starts_average_position_over_starts() -> None:
    """A model that predicts uniformly scores 8 bits per byte at every position after a start."""
    import numpy as np

    from horizonlm.bench.quality import _score_cold_starts

    class Uniform(torch.nn.Module):
        def forward(self, tokens, state=None):
            return torch.zeros(*tokens.shape, 256), None  # (B, L, V)

    bins = np.array([1, 2, 10, 51])
    tokens = np.arange(1000, dtype=np.uint8)
    result = _score_cold_starts(Uniform(), tokens, 4, 50, "cpu", bins, batch=3)
    assert result["tokens"] == 200 and [b["from"] for b in result["by_position"]] == [1, 2, 10]
    assert all(abs(b["bits_per_byte"] - 8.0) < 1e-5 for b in result["by_position"])
    assert np.allclose(result["by_start"], 8.0) and np.shape(result["by_start"]) == (4, 3)
    assert all(b["stderr"] == pytest.approx(0.0, abs=1e-6) for b in result["by_position"])


def test_cold_starts_record_each_start_for_pairing() -> None:
    """by_start holds each start's mean loss in each bin (checked against the losses by hand), and
    each bin's stderr is their standard error over the starts."""
    import math

    from horizonlm.bench.quality import _score_cold_starts

    class Favourite(torch.nn.Module):
        """Puts its weight on byte 7 (logit 40, the rest 0): byte 7 costs ~0 bits, any other ~57.7."""

        def forward(self, tokens, state=None):
            logits = torch.zeros(*tokens.shape, 256)  # (B, L, V)
            logits[..., 7] = 40.0
            return logits, None

    tokens = np.random.default_rng(0).integers(0, 16, 400).astype(np.uint8)
    bins = np.array([1, 3, 11])
    length, starts = 10, 3
    result = _score_cold_starts(Favourite(), tokens, starts, length, "cpu", bins, batch=2)
    want = []
    for start in np.linspace(0, len(tokens) - length - 1, starts).astype(np.int64):
        targets = tokens[start + 1 : start + length + 1]
        bits = np.where(targets == 7, 0.0, 40.0 / math.log(2) + math.log2(1 + 255 * math.exp(-40.0)))  # (length,)
        want.append([bits[:2].mean(), bits[2:].mean()])
    assert np.allclose(result["by_start"], want, atol=1e-3)
    spread = np.std(want, axis=0, ddof=1) / math.sqrt(starts)
    assert [b["stderr"] for b in result["by_position"]] == pytest.approx(spread.tolist(), abs=1e-3)


def test_protocol_stages_sweep_then_main_without_retraining(tmp_path: Path, monkeypatch) -> None:
    """--stage sweep records each candidate's score and nothing else; --stage main trains only the
    main run, at the rate the recorded sweep chose (the sweep is not run again); the protocol,
    the seed and the data are recorded; a main run with no recorded sweep is refused."""
    from horizonlm.bench import quality

    prepare("shakespeare", tmp_path / "data")
    out = tmp_path / "quality.json"
    common = ["--data", str(tmp_path / "data"), "--wikitext-raw", "", "--wikitext-tokens", "", "--preset", "tiny",
              "--minutes", "0.005", "--sweep-minutes", "0.005", "--batch-size", "2", "--seq-len", "32",
              "--eval-window", "64", "--max-eval-tokens", "500", "--cold-starts", "2", "--cold-length", "40",
              "--runs", str(tmp_path / "runs"), "--out", str(out), "--device", "cpu", "--lrs", "0.003,0.01"]
    assert main(["bench", "quality", *common, "--models", "horizon_no_memory", "--stage", "main"]) == 2
    assert main(["bench", "quality", *common, "--models", "horizon", "--stage", "sweep"]) == 0
    swept = json.loads(out.read_text())
    assert swept["models"] == {} and [r["lr"] for r in swept["sweeps"]["horizon"]] == [0.003, 0.01]
    assert swept["data"]["path"] == str(tmp_path / "data") and swept["data"]["splits"]["train"]["sha256"]
    calls = []
    real = quality._run_task
    monkeypatch.setattr(quality, "_run_task", lambda cfg, name, lr, final, step_seconds=None:
                        calls.append((name, lr, final, step_seconds)) or real(cfg, name, lr, final, step_seconds))
    swept["renamed_entries"] = {"note": "kept by later calls"}
    out.write_text(json.dumps(swept))
    assert main(["bench", "quality", *common, "--models", "horizon", "--stage", "main", "--seed", "1"]) == 0
    assert json.loads(out.read_text())["renamed_entries"] == {"note": "kept by later calls"}
    best = min(swept["sweeps"]["horizon"], key=lambda r: r["valid_bits_per_byte"])
    # the main run's schedule is sized by the sweep run's recorded time per step: no probe run
    assert best["seconds_per_step"] > 0
    assert calls == [("horizon", best["lr"], True, best["seconds_per_step"])]
    assert not (tmp_path / "runs" / "horizon-seed1-probe").exists()
    best = best["lr"]
    entry = json.loads(out.read_text())["models"]["horizon-seed1"]
    assert entry["lr"] == best and entry["seed"] == 1 and entry["lr_from"] == "own sweep"
    summary = json.loads(out.read_text())["summary"]
    assert main(["bench", "quality", *common, "--models", "horizon_no_memory", "--stage", "sweep"]) == 0
    again = json.loads(out.read_text())  # a later sweep keeps the main runs' summary and the records beside it
    assert again["summary"] == summary and again["renamed_entries"] == {"note": "kept by later calls"}


def test_a_protocol_fixes_its_settings_and_results_of_another_are_refused(tmp_path: Path) -> None:
    from horizonlm.bench.quality import PROTOCOLS

    cfg = QualityConfig(protocol="h200-8min", minutes=1.0, recall_cloze=0.5)
    assert all(getattr(cfg, k) == v for k, v in PROTOCOLS["h200-8min"].items()) and cfg.minutes >= 8
    assert cfg.recall_cloze == 0.0  # the mix is the protocol's, every question included
    prose = QualityConfig(protocol="h200-8min-prose")  # the recall mix's cost: the same but prose alone
    assert prose.recall_every == 0 and cfg.recall_every > 0
    assert {k: v for k, v in PROTOCOLS["h200-8min-prose"].items() if k != "recall_every"} == {
        k: v for k, v in PROTOCOLS["h200-8min"].items() if k != "recall_every"}
    with pytest.raises(ValueError, match="protocol"):
        QualityConfig(protocol="h100-1min")
    with pytest.raises(ValueError, match="stage"):
        QualityConfig(stage="both")
    out = tmp_path / "q.json"
    out.write_text(json.dumps({"models": {}, "sweeps": {}}))
    prepare("shakespeare", tmp_path / "data")
    with pytest.raises(HorizonError, match="protocol"):
        run_quality(QualityConfig(protocol="h200-8min", data=str(tmp_path / "data"), out=str(out), device="cpu"))


def test_step_seconds_is_the_mean_of_a_filling_memory_without_outliers() -> None:
    """Steps that slow from 0.4 to 1.0 s as a memory fills, a 9 s validation among them: the
    budget holds (total time / mean step) steps, so the estimate is the ramp's mean (a margin
    quicker), not its quick start, and the validation does not count."""
    deltas = list(np.linspace(0.4, 1.0, 60))
    deltas[30] += 9.0
    times = np.concatenate([[0.0, 5.0, 6.0, 7.0], 7.0 + np.cumsum(deltas)]).tolist()  # warm-up, then the ramp
    assert abs(_step_seconds(times) - STEP_MARGIN * 0.7) < 0.005


def test_a_timing_probe_covers_one_fill_of_the_memory() -> None:
    def cfg(model: str = "horizon", reset: int = 64, **overrides) -> TrainConfig:
        return TrainConfig(data="unused", out="unused", model=model, preset="base", model_overrides=overrides,
                           seq_len=8192, reset_stream_every=reset)

    assert _fill_steps(cfg()) == 1  # 64 chunks of 128 tokens: one window
    assert _fill_steps(cfg(memory_capacity=4096)) == 64  # 512K tokens
    assert _fill_steps(cfg(reset=16, memory_capacity=4096)) == 16  # restarted cold before it fills
    assert _fill_steps(cfg(use_memory=False)) == 0
    assert _fill_steps(cfg(model="transformer")) == 0


def test_moving_mean_matches_a_loop():
    values = np.random.default_rng(0).normal(size=40)  # (40,)
    expected = [values[i:i + 25].mean() for i in range(40 - 25 + 1)]
    np.testing.assert_allclose(_moving_mean(values, 25), expected)
    np.testing.assert_allclose(_moving_mean(values[:3], 25), [values[:3].mean()])  # a short run: one mean of all


def test_plot_quality_draws_entries_without_a_validation_curve(tmp_path: Path):
    """The protocol's main runs record one validation point: the plot draws their training loss instead,
    for more models than one colour map of ten holds."""
    entry = {"loss_curve": [[float(s), 3.0 - s / 100] for s in range(60)], "valid_curve": [[60.0, 1.5]],
             "scores": {"novels_test_carried": {"by_position": [{"from": 1, "to": 2, "bits_per_byte": 8.0},
                                                               {"from": 2, "to": 6, "bits_per_byte": 2.0}]}}}
    plot_quality({"models": {f"model{i}": entry for i in range(12)}}, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 10_000
