"""``horizon bench memory --read`` on the CPU: tiny sizes run the torch twin end to end (checks
pass, rows timed, results under "read" beside the other parts); the GPU sizes are refused with a
message that names the flags; a section the results file already holds is replaced only with
--overwrite (refused before anything runs, the file left as it was)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from horizonlm.bench.memory import MemoryBenchConfig, run_memory_bench
from horizonlm.cli import main
from horizonlm.errors import HorizonError

TINY_READ: dict[str, Any] = dict(read=True, read_device="cpu", read_queries=70, read_entries=300, read_dims="16",
                                 read_topks="4", read_dtypes="float32", read_dense_queries=40, read_check_queries=50,
                                 read_check_entries=640)
"""The smallest --read the CPU runs in well under a second."""
TINY_READ_FLAGS: list[str] = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in TINY_READ.items()]
"""The same settings as flags of ``horizon bench memory``."""


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
    # within the bench's own margin (1.1x): the two round differently, and since the dense path sends
    # a tied score's gradient to the entry it returns, its error is within 0.3% of the fast path's
    assert row["ok"] and 0 < row["grad_keys_rel_err"] <= 1.1 * row["dense_grad_keys_rel_err"], row
    assert row["read_rel_err"] > 1e-3  # bf16 is not float64: the check compares, it does not pretend


def test_read_part_refuses_gpu_sizes_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    with pytest.raises(HorizonError, match="needs a CUDA device.*--read-queries"):
        run_memory_bench(MemoryBenchConfig(out=str(out), read=True, read_device="cpu"))
    with pytest.raises(HorizonError, match="one at a time"):
        run_memory_bench(MemoryBenchConfig(out=str(out), read=True, gpu=True))
    assert not out.exists()


@pytest.mark.parametrize("part", ["read", "cpu", "gpu"])
def test_existing_section_is_refused_without_overwrite_and_left_as_it_was(tmp_path: Path, capsys, monkeypatch,
                                                                          part: str) -> None:
    """Refused before anything is measured (a refusal after the run would waste it), through the
    command line: exit 2, the flag to pass named, the file byte-identical."""
    import horizonlm.bench.memory as memory

    def measured(*_: Any) -> None:
        raise AssertionError("measured before refusing")

    for name in ("bench_read", "bench_cpu", "bench_gpu"):
        monkeypatch.setattr(memory, name, measured)
    out = tmp_path / "memory.json"
    out.write_text(json.dumps({part: {"rows": ["a user's results"]}, "other": {"rows": []}}, indent=1))
    before = out.read_bytes()
    flags = {"read": TINY_READ_FLAGS, "cpu": ["--sizes=100", "--backends=torch"], "gpu": ["--gpu"]}[part]
    assert main(["bench", "memory", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert f"already holds bench memory's '{part}' results" in err and "pass --overwrite" in err, err
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.json"]  # no temporary file, no PNG


def test_overwrite_replaces_the_read_section_and_keeps_the_others(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    out.write_text(json.dumps({"read": {"stale": True}, "cpu": {"rows": ["kept"]}}))
    run_memory_bench(MemoryBenchConfig(out=str(out), overwrite=True, **TINY_READ))
    results = json.loads(out.read_text())
    assert "stale" not in results["read"] and results["read"]["config"]["overwrite"] is True
    assert results["read"]["checks"] and all(row["ok"] for row in results["read"]["checks"])
    assert results["cpu"] == {"rows": ["kept"]}


def test_read_section_is_added_to_a_file_without_one_keeping_its_sections(tmp_path: Path) -> None:
    """No --overwrite needed: the read check is stored beside the store sizes, which stay as they were."""
    out = tmp_path / "memory.json"
    others = {"cpu": {"rows": [{"entries": 100, "backend": "torch"}]}, "gpu": {"rows": [{"part": "gpu_ingest"}]}}
    out.write_text(json.dumps(others))
    results = run_memory_bench(MemoryBenchConfig(out=str(out), **TINY_READ))
    on_disk = json.loads(out.read_text())
    assert on_disk == results and set(on_disk) == {"cpu", "gpu", "read"}
    assert {k: on_disk[k] for k in others} == others
    assert on_disk["read"]["selection"] == "torch twin" and on_disk["read"]["rows"]


def test_results_file_that_is_not_one_is_refused_before_the_run(tmp_path: Path) -> None:
    """Not JSON, or JSON that is not an object: refused, never replaced by the new section."""
    for text in ("not json {", "[1, 2]"):
        out = tmp_path / "memory.json"
        out.write_text(text)
        with pytest.raises(HorizonError, match="not a memory results file.*give another --out"):
            run_memory_bench(MemoryBenchConfig(out=str(out), overwrite=True, **TINY_READ))
        assert out.read_text() == text


def test_tiles_are_parsed_and_refused_off_the_gpu_before_anything_runs(tmp_path: Path) -> None:
    from horizonlm.bench.memory import _parse_tiles

    assert _parse_tiles(" 64x128, 128X64 ,") == [(64, 128), (128, 64)]
    for bad in ("64", "64x100", "8x64", "ax64"):
        with pytest.raises(HorizonError, match="--read-tiles"):
            _parse_tiles(bad)
    out = tmp_path / "read.json"
    with pytest.raises(HorizonError, match="needs a CUDA device"):
        run_memory_bench(MemoryBenchConfig(out=str(out), read_tiles="128x64", **TINY_READ))
    assert not out.exists()
