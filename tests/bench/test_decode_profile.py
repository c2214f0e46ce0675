"""``profile_decode`` on the CPU: every kind of step is found and counted (the numbers are only
measured on a GPU, by ``horizon bench speed --parts decode_profile``), and the attribution of
device work to steps on synthetic GPU-like profiles."""

from __future__ import annotations

import pytest
import torch

from horizonlm.bench.decode_profile import (
    Span,
    attribute,
    busy_ms,
    device_work,
    profile_decode,
    profile_rows,
    step_index,
)

from ..conftest import make_horizon


def test_profile_counts_replayed_capturing_and_chunk_end_steps() -> None:
    model = make_horizon(dtype=torch.float32).eval()
    chunk = model.config.chunk_size
    with torch.no_grad():
        state = model(torch.randint(0, 256, (1, 5)))[1]
        result = profile_decode(model, state, steps=2 * chunk, bf16=False, graph_chunk_ends=False,
                                fill_frame_entries=0)
    assert result["eager"]["steps"] == 2 and result["capture"]["steps"] == 2  # two chunk ends, two captures
    assert "chunk_end" not in result
    assert result["replay"]["steps"] == 2 * chunk - 4
    for kind in ("eager", "capture", "replay"):
        row = result[kind]
        assert row["kernels_per_step"] > 0 and row["median_wall_ms"] > 0 and row["median_wall_ms_unprofiled"] > 0
        assert row["counted"] == "outermost CPU operators inside the step's host range"
        assert 0 < len(row["kernels_first_steps"]) <= 8
    # a capture runs the step three times (two warm-ups, then the replay of the capture)
    assert result["capture"]["kernels_per_step"] > 2 * result["replay"]["kernels_per_step"]
    attribution = result["attribution"]
    assert attribution["steps_run"] == attribution["host_step_ranges"] == 2 * chunk
    assert attribution["items_outside_steps"] == 0 and attribution["device_range_copies"] == 0


def test_profile_of_the_default_decoder_has_replays_only() -> None:
    """The default decoder pads the filling memory and replays its chunk ends: after the warm-up
    chunk every step replays one of two graphs, and the chunk ends are counted apart."""
    model = make_horizon(dtype=torch.float32).eval()
    chunk = model.config.chunk_size
    with torch.no_grad():
        state = model(torch.randint(0, 256, (1, 5)))[1]
        result = profile_decode(model, state, steps=2 * chunk, bf16=False)
    assert result["chunk_end"]["steps"] == 2 and result["replay"]["steps"] == 2 * chunk - 2
    assert "eager" not in result and "capture" not in result


def test_step_index_reads_host_ranges_only() -> None:
    assert step_index(Span("decode_step_12", 0, 1)) == 12
    assert step_index(Span("decode_step_12", 0, 1, on_device=True, annotation=True)) is None  # the GPU copy
    assert step_index(Span("decode_step_replay", 0, 1)) is None
    assert step_index(Span("aten::mm", 0, 1)) is None


def test_device_work_drops_annotations_and_range_copies() -> None:
    spans = [Span("decode_step_0", 0, 10, on_device=True), Span("some_range", 0, 10, on_device=True, annotation=True),
             Span("gemm", 1, 2, on_device=True), Span("Memcpy DtoD", 2, 3, on_device=True), Span("aten::mm", 1, 2)]
    assert [s.name for s in device_work(spans)] == ["gemm", "Memcpy DtoD"]


def test_attribute_by_start_inside_disjoint_ranges() -> None:
    ranges = [Span("b", 20, 30), Span("a", 0, 10)]  # any order
    items = [Span("x", 0, 1), Span("y", 10, 11), Span("z", 15, 16), Span("w", 29, 40), Span("v", -1, 5)]
    grouped, outside = attribute(ranges, items)
    assert [[s.name for s in g] for g in grouped] == [["w"], ["x", "y"]]
    assert outside == 2  # z between the ranges, v before the first


def test_busy_time_counts_overlaps_once() -> None:
    spans = [Span("a", 0, 1000), Span("b", 500, 1500), Span("c", 3000, 3500), Span("d", 3100, 3200)]
    assert busy_ms(spans) == pytest.approx(2.0)
    assert busy_ms([]) == 0.0


def _gpu_profile() -> tuple[list[Span], list[tuple[str, float]]]:
    """A GPU-like profile of three steps (capture, replay, eager) as the profiler writes it: a host
    range per step, a device copy of it per stream with work (as long as that work), the kernels,
    and a graph launch on the host for each replay. Kernels: 3 (+ 6 warm-up) / 3 / 4, 0.5 ms each."""
    spans: list[Span] = []
    plan = [("capture", 0.0, 9, 1), ("replay", 10_000.0, 3, 1), ("eager", 20_000.0, 4, 0)]
    for i, (_, t0, kernels, launches) in enumerate(plan):
        spans.append(Span(f"decode_step_{i}", t0, t0 + 5_000, annotation=True))
        spans += [Span("cudaGraphLaunch", t0 + 10, t0 + 20)] * launches
        work = [Span(f"k{j}", t0 + 100 + 500 * j, t0 + 600 + 500 * j, on_device=True) for j in range(kernels)]
        spans += work
        spans.append(Span(f"decode_step_{i}", work[0].start_us, work[-1].end_us, on_device=True, annotation=True))
        spans.append(Span(f"decode_step_{i}", work[0].start_us, work[0].end_us, on_device=True, annotation=True))
    walls = [("capture", 0.005), ("replay", 0.004), ("eager", 0.005)]
    return spans, walls


def test_rows_count_each_step_once_and_never_the_range_copies() -> None:
    spans, walls = _gpu_profile()
    result = profile_rows(spans, device_work(spans), walls, [("replay", 0.002)], on_gpu=True)
    assert {k: result[k]["steps"] for k in ("capture", "replay", "eager")} == {"capture": 1, "replay": 1, "eager": 1}
    assert [result[k]["kernels_per_step"] for k in ("capture", "replay", "eager")] == [9, 3, 4]
    replay = result["replay"]
    assert replay["kernel_ms_per_step"] == pytest.approx(1.5)  # the kernels alone, not the range copies
    assert replay["kernel_ms_per_step"] <= replay["median_wall_ms"]
    assert replay["device_busy_ms_per_step"] == pytest.approx(1.5)
    assert replay["graph_launches_per_step"] == 1 and result["eager"]["graph_launches_per_step"] == 0
    assert replay["median_wall_ms_unprofiled"] == pytest.approx(2.0)
    assert "median_wall_ms_unprofiled" not in result["eager"]
    attribution = result["attribution"]
    assert attribution["host_step_ranges"] == 3 and attribution["device_range_copies"] == 6
    assert attribution["items_outside_steps"] == 0
    assert attribution["first_replay_items"] == {"k0": 1, "k1": 1, "k2": 1}
