"""``horizon bench speed`` on the CPU: what the FLOP count counts, the MFU columns, and the
graph-vs-eager decode checks (run here through the decoders' CPU replay path)."""

from __future__ import annotations

import pytest
import torch

from horizonlm.bench.speed import (
    DATASHEET_BF16_DENSE_FLOPS,
    PEAK_BF16_FLOPS,
    SpeedConfig,
    _build,
    _train_step,
    check_graphed_decode,
    check_graphed_transformer_decode,
    flop_counts,
    matmul_params,
    mfu_columns,
    mfu_peaks,
    train_flops_per_token,
    whole_chunks_mean,
)

from ..conftest import make_horizon, make_transformer


def test_chunk_end_projections_count_once_per_chunk() -> None:
    model = make_horizon(memory_kind="chunk")
    cfg = model.config
    d, s, k = cfg.d_model, cfg.supervisor_dim, cfg.memory_dim
    counts = matmul_params(model)
    per_chunk = d * s + 2 * 3 * s * s + 2 * d * k  # summary, GRU (input and hidden), key, value
    assert counts["per_chunk"] == per_chunk
    every_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert counts["per_token"] == every_linear - (d * s + 2 * d * k)  # the head (tied) once
    assert counts["effective"] == counts["per_token"] + per_chunk / cfg.chunk_size
    assert train_flops_per_token(model, 1000) == 6 * counts["effective"]


def test_induction_memory_projections_count_at_every_token() -> None:
    """The induction memory writes a key and a value at every token: only the supervisor's
    summary and GRU stay per chunk."""
    model = make_horizon()
    cfg = model.config
    d, s, k = cfg.d_model, cfg.supervisor_dim, cfg.memory_dim
    counts = matmul_params(model)
    assert counts["per_chunk"] == d * s + 2 * 3 * s * s
    every_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert counts["per_token"] == every_linear - d * s


def test_transformer_counts_attention_per_context_token() -> None:
    model = make_transformer()
    counts = matmul_params(model)
    assert counts["per_chunk"] == 0 and counts["effective"] == counts["per_token"]
    cfg = model.config
    assert (train_flops_per_token(model, 100) - train_flops_per_token(model, 0)
            == pytest.approx(6 * cfg.n_layers * cfg.d_model * 100))


def test_flop_counts_match_the_models() -> None:
    counts = flop_counts("tiny")
    horizon = make_horizon(dtype=torch.float32)
    assert counts["horizon"]["parameters"] == horizon.num_parameters()
    assert counts["horizon"]["matmul_parameters"] == matmul_params(horizon)
    assert counts["horizon"]["forward_matmul_flops_per_token"] == 2 * matmul_params(horizon)["effective"]


def test_mfu_against_three_peaks() -> None:
    peaks = mfu_peaks({"bf16_matmul_flops": 500e12})
    cols = mfu_columns(250e12, peaks)
    assert cols["mfu"] == pytest.approx(250 / 790) and peaks["quoted"] == PEAK_BF16_FLOPS
    assert cols["mfu_vs_measured_matmul"] == pytest.approx(0.5)
    assert cols["mfu_vs_datasheet"] == pytest.approx(250e12 / DATASHEET_BF16_DENSE_FLOPS)
    assert mfu_columns(1.0, mfu_peaks(None))["mfu_vs_measured_matmul"] is None


def test_whole_chunks_mean_skips_the_first_chunk_touched_and_takes_whole_chunks() -> None:
    """Chunk 4: from position 6, the chunks touched are [4, 8), [8, 12), [12, 16); the first is
    partial and carries first-time work, so steps 2..9 (positions 8..15) are the whole chunks."""
    times = [100.0, 100.0] + [1.0, 1.0, 1.0, 5.0] * 2 + [7.0]  # (11 steps from position 6)
    assert whole_chunks_mean(times, 6, 4) == 2.0
    assert whole_chunks_mean(times, 8, 4) == 2.0  # from a chunk start: that chunk skipped, steps 4..7
    assert whole_chunks_mean(times, 9, 4) == (1 + 1 + 5 + 1 + 1 + 1 + 5 + 7) / 8  # steps 3..10, two chunks
    assert whole_chunks_mean(times[:9], 6, 4) == 2.0  # one whole chunk, the next incomplete
    assert whole_chunks_mean(times[:5], 6, 4) is None


def test_decode_checks_run_on_cpu() -> None:
    device = torch.device("cpu")
    assert check_graphed_decode(device, preset="tiny", prefix=5, steps=20) < 1e-5
    assert check_graphed_decode(device, preset="tiny", prefix=5, steps=20, graph_chunk_ends=True) < 1e-5
    assert check_graphed_decode(device, preset="tiny", prefix=5, steps=20, kind="horizon_count_cache", symbols=4) < 1e-5
    assert check_graphed_transformer_decode(device, preset="tiny", prefix=5, steps=20) < 1e-5


def test_variants_are_horizon_variants_of_the_quality_bench() -> None:
    """Variants timed beside the default are built with their quality-bench overrides; a name that
    is not a HorizonLM variant is refused before anything runs."""
    assert SpeedConfig(variants="horizon_no_memory, horizon_no_late_read").variant_list == [
        "horizon_no_memory", "horizon_no_late_read"]
    for bad in ("horizon_nope", "transformer", "horizon", "gla"):
        with pytest.raises(ValueError, match="variants"):
            SpeedConfig(variants=bad)
    assert _build("horizon_no_memory", "tiny", None).memory is None
    assert _build("horizon_no_late_read", "tiny", None).late_read is None
    assert _build("horizon", "tiny", None).late_read is not None


def test_speed_parts_are_checked() -> None:
    """A misspelt part is refused, not silently skipped on a GPU."""
    assert SpeedConfig(parts="checks,decode_profile").parts == "checks,decode_profile"
    assert SpeedConfig(parts="train,train_profile", profile_data="runs/data/novels").parts == "train,train_profile"
    with pytest.raises(ValueError, match="parts"):
        SpeedConfig(parts="checks,decod")


def test_an_existing_results_file_is_refused_before_anything_runs(tmp_path, capsys) -> None:
    from horizonlm.cli import main

    out = tmp_path / "speed.json"
    out.write_text('{"rows": []}')
    assert main(["bench", "speed", "--out", str(out), "--parts", "decode"]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == '{"rows": []}'


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_a_timed_training_step_learns_and_carries_the_state() -> None:
    """The step the train rows and the train profile time: each call one optimizer step on its
    batch, the state (here the count cache's too) carried from the call before."""
    model = make_horizon(dtype=torch.float32, count_lengths=(2, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 4, (2, 33), generator=torch.Generator().manual_seed(0))  # (B, L + 1)
    weight = model.head.weight.detach().clone()
    positions = []
    original = model.forward

    def forward(x, state=None):
        positions.append(0 if state is None else state.pos)
        return original(x, state)

    model.forward = forward
    step = _train_step(model, opt, lambda: tokens)
    for _ in range(3):
        step()
    assert positions == [0, 32, 64] and not torch.equal(model.head.weight, weight)


def test_a_missing_profile_corpus_is_refused_before_anything_runs(tmp_path, capsys) -> None:
    """The profile's corpus is opened first: a wrong path stops the command at once, on any
    machine, and leaves no results file."""
    from horizonlm.cli import main

    out = tmp_path / "speed.json"
    code = main(["bench", "speed", "--out", str(out), "--parts", "train,train_profile",
                 "--profile-data", str(tmp_path / "no_corpus")])
    assert code == 2 and "no_corpus" in capsys.readouterr().err and not out.exists()
