"""What one decode step is made of: kernels launched, their summed device time, and the wall time,
for the steps that replay a graph, the steps that capture one, and the chunk-end steps that run
eagerly.

The decode goal (2 ms a token at batch 1) is a question of how a step spends its time: a step
whose kernels add up to far less than its wall time waits on launches and the host, one whose
kernels fill it is bound by the kernels themselves. ``torch.profiler`` sees both. Each step runs
inside a ``record_function`` range of its own (``decode_step_<i>``) that ends after a device
synchronize, so every device activity the step launched starts (and ends) inside the range and
none of the next step's does: a device activity belongs to the step whose host range holds its
start. Only the host side of a range marks a step: on a GPU the profiler also writes a device-side
copy of each range (a ``gpu_user_annotation``, one per stream the step ran on, as long as the
step's device work), which is neither a step nor a kernel. On a CPU there are no device
activities and the counts are of outermost CPU operators (a smoke test of the bookkeeping, not a
measurement).
"""

from __future__ import annotations

import bisect
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from horizonlm.decode import GraphedDecoder
from horizonlm.state import HorizonState

STEP_KINDS = ("replay", "chunk_end", "capture", "eager")
"""How a step runs: a replay of the in-chunk graph, a replay of the chunk-end graph, the step that
first captures a graph (its warm-ups, the capture, then the replay), or eagerly (a chunk end the
decoder does not replay)."""

STEP_PREFIX = "decode_step_"
"""The name of a step's profiler range, followed by the step's index in the profiled window."""

FIRST_STEPS = 8
"""How many steps of each kind keep their own kernel count in the row (raw data for a reader)."""


@dataclass(frozen=True)
class Span:
    """What the attribution reads of one profiler event: times in µs on the trace's clock, whether
    it ran on the device, and whether it is an annotation (a range, not work)."""

    name: str
    start_us: float
    end_us: float
    on_device: bool = False
    annotation: bool = False

    @property
    def ms(self) -> float:
        return (self.end_us - self.start_us) / 1000


def step_index(span: Span) -> int | None:
    """The index of the step whose host range ``span`` is, or None (device-side copies of a range
    and every other event are not steps)."""
    if span.on_device or not span.name.startswith(STEP_PREFIX):
        return None
    suffix = span.name[len(STEP_PREFIX):]
    return int(suffix) if suffix.isdigit() else None


def device_work(spans: Iterable[Span]) -> list[Span]:
    """Device activities that are work (kernels, memcpy, memset): annotations, among them the
    device-side copies of the step ranges, are dropped."""
    return [s for s in spans if s.on_device and not s.annotation and not s.name.startswith(STEP_PREFIX)]


def attribute(ranges: Sequence[Span], items: Iterable[Span]) -> tuple[list[list[Span]], int]:
    """Each item in the range (of ``ranges``, disjoint) that holds its start; per range its items,
    and how many items no range holds."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i].start_us)
    starts = [ranges[i].start_us for i in order]
    grouped: list[list[Span]] = [[] for _ in ranges]
    outside = 0
    for item in items:
        at = bisect.bisect_right(starts, item.start_us) - 1
        if at >= 0 and item.start_us <= ranges[order[at]].end_us:
            grouped[order[at]].append(item)
        else:
            outside += 1
    return grouped, outside


def busy_ms(spans: Iterable[Span]) -> float:
    """Time during which at least one of ``spans`` runs: overlapping activities (several streams)
    count once, so this, unlike their sum, cannot exceed the step's wall time."""
    total, end = 0.0, float("-inf")
    for span in sorted(spans, key=lambda s: s.start_us):
        if span.end_us > end:
            total += span.end_us - max(span.start_us, end)
            end = span.end_us
    return total / 1000


def is_copy(span: Span) -> bool:
    """A memcpy or memset rather than a kernel (the profiler's names for CUDA copies and fills)."""
    return span.name.startswith(("Memcpy", "Memset"))


def is_graph_launch(span: Span) -> bool:
    """The host's launch of a CUDA graph (the runtime or driver call)."""
    return not span.on_device and "GraphLaunch" in span.name


def summarize(per_step: Sequence[Sequence[Span]], launches: Sequence[int], walls: Sequence[float],
              unprofiled: Sequence[float]) -> dict[str, Any]:
    """Medians over the steps of one kind, from each step's attributed work, its graph launches
    and its wall seconds (with the profiler, and without it where timed)."""
    row: dict[str, Any] = {
        "steps": len(per_step),
        "median_wall_ms": 1000 * statistics.median(walls),
        "kernels_per_step": statistics.median(len(k) for k in per_step),
        "kernel_ms_per_step": statistics.median(sum(s.ms for s in k) for k in per_step),
        "device_busy_ms_per_step": statistics.median(busy_ms(k) for k in per_step),
        "memcpy_memset_per_step": statistics.median(sum(map(is_copy, k)) for k in per_step),
        "graph_launches_per_step": statistics.median(launches),
        "kernels_first_steps": [len(k) for k in per_step[:FIRST_STEPS]],
    }
    if unprofiled:
        row["median_wall_ms_unprofiled"] = 1000 * statistics.median(unprofiled)
        row["unprofiled_steps"] = len(unprofiled)
    return row


def _common_names(items: Sequence[Span], top: int = 12) -> dict[str, int]:
    """The most frequent names among one step's items (cut to 80 characters): what a count is
    made of, for a reader of the row."""
    return dict(Counter(s.name[:80] for s in items).most_common(top))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_steps(decoder: GraphedDecoder, token: torch.Tensor, steps: int, device: torch.device
               ) -> list[tuple[str, float]]:
    """Per step its kind and wall seconds, the range ``decode_step_<i>`` around it ending after a
    synchronize (so the step's device work lies inside it). The kind is read off the decoder's
    counters after the step, not predicted."""
    out = []
    for i in range(steps):
        captures, eager = decoder.captures + decoder.end_captures, decoder.eager_steps
        ends_chunk = (decoder.state.pos + 1) % decoder.model.config.chunk_size == 0
        _sync(device)
        start = time.perf_counter()
        with record_function(f"{STEP_PREFIX}{i}"):
            decoder.step(token)
            _sync(device)
        wall = time.perf_counter() - start
        made = decoder.captures + decoder.end_captures > captures
        kind = ("eager" if decoder.eager_steps > eager else "capture" if made
                else "chunk_end" if ends_chunk else "replay")
        out.append((kind, wall))
    return out


def _spans(prof: profile, device: torch.device) -> tuple[list[Span], list[Span]]:
    """The profile as spans, and the items to attribute: device work on a GPU, the outermost
    CPU operators on a CPU."""
    events = prof.events()

    def span(e: Any) -> Span:
        on_device = e.device_type != DeviceType.CPU
        return Span(e.name, e.time_range.start, e.time_range.end, on_device,
                    bool(getattr(e, "is_user_annotation", False)))

    spans = [span(e) for e in events]
    if device.type == "cuda":
        return spans, device_work(spans)
    outermost = [span(e) for e in events if e.name.startswith("aten::")
                 and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return spans, outermost


def profile_decode(model: nn.Module, state: HorizonState, steps: int, bf16: bool | None = None,
                   **decoder_options: Any) -> dict[str, Any]:
    """Profile ``steps`` graphed decode steps of ``model`` from ``state``, after one chunk of
    warm-up steps and ``steps`` steps timed the same way without the profiler (its overhead is
    their difference). Per step kind (see :data:`STEP_KINDS`): steps, median wall ms, and per step
    the kernels (device activities on a GPU, outermost CPU operators on a CPU), their summed and
    their overlap-free time in ms; under ``attribution``, what was counted and what was left out.
    ``decoder_options`` go to :class:`GraphedDecoder` (its defaults are what a user decodes with)."""
    device = model.embed.weight.device
    decoder = GraphedDecoder(model, state, bf16=bf16, **decoder_options)
    token = torch.zeros(state.batch_size, 1, dtype=torch.long, device=device)  # (B, 1)
    _run_steps(decoder, token, model.config.chunk_size, device)  # a capture and a chunk end first
    unprofiled = _run_steps(decoder, token, steps, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        profiled = _run_steps(decoder, token, steps, device)
    spans, items = _spans(prof, device)
    return profile_rows(spans, items, profiled, unprofiled, on_gpu=device.type == "cuda")


def profile_rows(spans: Sequence[Span], items: Sequence[Span], profiled: Sequence[tuple[str, float]],
                 unprofiled: Sequence[tuple[str, float]], on_gpu: bool) -> dict[str, Any]:
    """The rows of :func:`profile_decode` from the profile's ``spans`` (the host ranges of the
    steps among them), the ``items`` to attribute, and the kind and wall seconds of each profiled
    and each unprofiled step (in step order)."""
    indexed = [(i, s) for s in spans if (i := step_index(s)) is not None]
    ranges = dict(indexed)
    order = sorted(ranges)
    grouped, outside = attribute([ranges[i] for i in order], items)
    launched, _ = attribute([ranges[i] for i in order], [s for s in spans if is_graph_launch(s)])
    counted = ("device activities (kernels, memcpy, memset) that start inside the step's host range" if on_gpu
               else "outermost CPU operators inside the step's host range")
    result: dict[str, Any] = {}
    for kind in STEP_KINDS:
        at = [n for n, i in enumerate(order) if profiled[i][0] == kind]
        if at:
            row = summarize([grouped[n] for n in at], [len(launched[n]) for n in at],
                            [profiled[order[n]][1] for n in at], [w for k, w in unprofiled if k == kind])
            statistic = f"median over the {kind} steps, one host range each"
            result[kind] = {**row, "counted": counted, "statistic": statistic}
    first_replay = next((grouped[n] for n, i in enumerate(order) if profiled[i][0] == "replay"), [])
    result["attribution"] = {
        "steps_run": len(profiled), "host_step_ranges": len(indexed),
        "device_range_copies": sum(1 for s in spans if s.on_device and s.name.startswith(STEP_PREFIX)),
        "device_annotations": sum(1 for s in spans if s.on_device and s.annotation),
        "items_outside_steps": outside,
        "first_replay_items": _common_names(first_replay),
        "method": ("a step is its host range (decode_step_<i>, closed by a synchronize); an item belongs to the "
                   "range that holds its start; the device-side copies of the ranges (gpu_user_annotation) and "
                   "other annotations are neither steps nor counted; capture steps (warm-ups, capture, first "
                   "replay) are apart from the replays"),
        "profiler_overhead": ("median_wall_ms is timed under the profiler (which records every kernel, each "
                              "node of a replayed graph too) and carries its cost; median_wall_ms_unprofiled "
                              "times the same kinds of step the same way (host clock, synchronized) just "
                              "before, without it"),
    }
    return result
