"""``horizon bench memory --read`` on the CPU: tiny sizes run the torch twin end to end (checks
pass, rows timed, results under "read" beside the other parts); the GPU sizes are refused with a
message that names the flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from horizonlm.bench.memory import MemoryBenchConfig, run_memory_bench
from horizonlm.errors import HorizonError


def test_read_part_runs_the_twin_at_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    out.write_text(json.dumps({"cpu": {"rows": []}}))
    cfg = MemoryBenchConfig(out=str(out), read=True, read_device="cpu", read_queries=70, read_entries=300,
                            read_dims="16", read_topks="4,32", read_dtypes="float32", read_dense_queries=40,
                            read_check_queries=50, read_check_entries=640)
    run_memory_bench(cfg)
    results = json.loads(out.read_text())
    assert "cpu" in results  # the other parts' results are kept
    read = results["read"]
    assert read["selection"] == "torch twin" and read["environment"]["device"] == "cpu"
    assert len(read["checks"]) == 2 and all(row["ok"] for row in read["checks"])
    assert all(row["same_set_fraction"] == 1.0 and row["finite_slots"] > 0 for row in read["checks"])
    path = read["read_path_checks"]  # the whole read, reads and gradients, against float64
    assert len(path) == 1 and path[0]["ok"] and path[0]["grad_keys_rel_err"] < 1e-5, path
    assert [row["top_k"] for row in read["rows"]] == [4, 32]
    assert all(row["ms"] > 0 and row["dense_ms"] > 0 and row["dense_queries_timed"] == 40 for row in read["rows"])


def test_read_path_check_in_bf16_holds_the_fast_path_to_the_dense_paths_rounding() -> None:
    """In bf16 both paths round (the dense one every score), so each is measured against float64
    of the same inputs and the fast path passes when it is no further off than the dense one."""
    import torch

    from horizonlm.bench.memory import _read_path_check

    row = _read_path_check(torch.bfloat16, torch.device("cpu"), batch=1, length=256, carried=512, chunk=32,
                           capacity=8, k=8, dim=32)
    assert row["ok"] and 0 < row["grad_keys_rel_err"] <= row["dense_grad_keys_rel_err"], row
    assert row["read_rel_err"] > 1e-3  # bf16 is not float64: the check compares, it does not pretend


def test_read_part_refuses_gpu_sizes_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    with pytest.raises(HorizonError, match="needs a CUDA device.*--read-queries"):
        run_memory_bench(MemoryBenchConfig(out=str(out), read=True, read_device="cpu"))
    with pytest.raises(HorizonError, match="one at a time"):
        run_memory_bench(MemoryBenchConfig(out=str(out), read=True, gpu=True))
    assert not out.exists()
