"""``horizon bench ssm`` end to end on the CPU at the tiny preset: every check within its float
tolerance, every layer timed, and an existing results file kept unless --overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from horizonlm.bench.ssm import SSMBenchConfig, run_ssm_bench
from horizonlm.errors import HorizonError


def test_tiny_run_checks_and_times(tmp_path: Path) -> None:
    out = tmp_path / "ssm.json"
    cfg = SSMBenchConfig(out=str(out), preset="tiny", batch_size=1, seq_len=40, chunks="8", repeat=1, warmup=0,
                         device="cpu")
    run_ssm_bench(cfg)
    results = json.loads(out.read_text())
    for name, errors in results["checks"].items():
        limit = 2e-2 if "bf16" in name else 1e-4
        assert all(v < limit for v in errors.values()), (name, errors)
    assert {"s4d_gated_T8", "selective_gated_T8", "multires_conv"} <= set(results["layers"])
    assert all(row["forward_backward_ms"] > 0 for row in results["layers"].values())
    before = out.read_bytes()
    with pytest.raises(HorizonError, match="--overwrite"):
        run_ssm_bench(cfg)
    assert out.read_bytes() == before
    with pytest.raises(ValueError, match="repeat"):
        SSMBenchConfig(repeat=0)
    with pytest.raises(ValueError, match="chunks"):
        SSMBenchConfig(chunks="8,x")
    with pytest.raises(ValueError, match="chunks"):
        SSMBenchConfig(chunks="12")
