"""``horizon bench speed``: HorizonLM and the transformer baseline side by side on one GPU.

Training throughput (forward + backward + AdamW step) at several lengths with a fixed number of
tokens per step, long prefill with the state carried, per-token decode latency after long
contexts, and exact memory search. Timings are CUDA-event medians after warm-up; every row
records peak memory. Failures (out of memory) are rows too.

Like for like: both models decode by CUDA graph replay (HorizonLM one graph per chunk until its
memory is full, then one for every chunk; the transformer one graph over a static KV cache); the
transformer's eager decode is kept as extra rows, ``transformer+eager``, labelled ``graphed: false``.
MFU is given against three peaks: the quoted 790 TFLOP/s, the bf16 matmul rate measured in the
same run, and the datasheet peak.

A peer named in ``models`` (``gla``, flash-linear-attention's GLA) is timed in training and in
prefill (its state carried between windows, as HorizonLM's), after its kernel is checked against a
float64 reference; it has no decode rows.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from horizonlm.baseline import TransformerLM
from horizonlm.bench.common import (
    environment,
    median,
    parse_ints,
    save_figure,
    time_cuda,
)
from horizonlm.bench.quality import ABLATIONS
from horizonlm.checkpoint import MODEL_KINDS, build_model, carries_state
from horizonlm.config import HorizonConfig, TransformerConfig
from horizonlm.data.stream import open_split
from horizonlm.decode import GraphedDecoder, GraphedTransformerDecoder
from horizonlm.errors import HorizonError
from horizonlm.fileio import atomic_write_json, refuse_existing
from horizonlm.model import HorizonLM
from horizonlm.ops.count_cache import check_count_cache_device
from horizonlm.peers.gla import check_gla_kernel

PEAK_BF16_FLOPS = 790e12
"""The bf16 dense matrix rate MFU is quoted against (the issue's figure for this H200)."""

DATASHEET_BF16_DENSE_FLOPS = 989e12
"""Dense bf16 tensor-core peak of the H200 SXM (the same as the H100 SXM): NVIDIA's H200
datasheet lists "BF16 Tensor Core 1,979 TFLOPS" with 2:4 sparsity, i.e. 989 TFLOPS dense
(third-party spec tables, e.g. hmc-tech.com's H100 SXM page, give 989.43 dense)."""


SPEED_PARTS = ("ceilings", "checks", "train", "prefill", "decode", "train_profile", "prefill_profile", "decode_profile",
               "memory")
"""The parts of ``horizon bench speed``, in the order they run."""


@dataclass
class SpeedConfig:
    """Settings of ``horizon bench speed``."""

    out: str = "bench/results/speed.json"
    """Where the JSON goes (the PNG lands beside it); refused if it exists, unless --overwrite."""
    overwrite: bool = False
    """Replace an existing results file."""
    preset: str = "base"
    """Preset of both models (same width, depth and MLP)."""
    parts: str = "ceilings,checks,train,prefill,decode,memory"
    """Comma-separated parts to run (not among the defaults: ``decode_profile``, HorizonLM's decode
    step profiled, kernels and their time against the wall time; ``prefill_profile``, one prefill
    window of HorizonLM after the memory has filled, its device time per module and per kernel;
    ``train_profile``, one training step of HorizonLM and each variant, the same views)."""
    models: str = "horizon,transformer"
    """Models of the checks, train, prefill and decode parts: ``horizon``, ``transformer`` and the
    peer ``gla`` (flash-linear-attention's GLA, extra ``[peers]``: checks, train and prefill; its
    decode rows say not run)."""
    tokens_per_step: int = 131072
    """Tokens per training step at every length (batch = tokens / length)."""
    train_lengths: str = "2048,8192,32768,131072"
    """Training sequence lengths."""
    prefill_lengths: str = "131072,1048576,10485760"
    """Prefill lengths (batch 1)."""
    prefill_window: int = 131072
    """Tokens per call when prefilling (state carried between calls)."""
    transformer_prefill_max: int = 262144
    """Longest transformer prefill attempted; longer ones are reported as not run."""
    decode_contexts: str = "1024,65536,1048576"
    """Context lengths before decoding."""
    decode_batches: str = "1,64"
    """Decode batch sizes."""
    decode_steps: int = 300
    """Timed graphed decode steps per row, both models (HorizonLM: over two chunk ends, so its
    eager chunk-end steps and graph captures are inside the mean; the transformer's one capture
    is inside its mean too)."""
    transformer_decode_steps: int = 20
    """Timed steps of the extra ``transformer+eager`` rows (eager, KV cache concatenated)."""
    memory_sizes: str = "10000,100000,1000000,10000000"
    """Entries in the exact-search benchmark."""
    memory_queries: str = "1,1024"
    """Query batch sizes in the exact-search benchmark."""
    memory_large_sizes: str = "100000000"
    """Larger stores searched with ``memory_large_queries`` queries only."""
    memory_large_queries: int = 64
    """Query batch for the larger stores."""
    repeat: int = 5
    """Timed repetitions per training row."""
    warmup: int = 2
    """Untimed repetitions first."""
    compile: bool = True
    """Also time training and prefill with every block torch.compile'd (rows labelled ``+compile``;
    HorizonLM and the transformer only)."""
    profile_data: str = ""
    """A prepared corpus (``horizon prepare``) whose train split feeds ``train_profile``'s steps, one
    contiguous stream a row (what a count cache sees in training); empty: random bytes."""
    variants: str = ""
    """HorizonLM variants also timed in training (eager) and decoding (through the graphed decoder;
    a count cache runs eagerly after each replayed step), by their ``bench quality`` names (e.g.
    ``horizon_no_memory,horizon_count_cache``): issue 25's step with the memory against the step
    without it, and what a variant's step costs."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.model_list if m not in MODEL_KINDS]
        if unknown or not self.model_list:
            raise ValueError(f"models must name some of {', '.join(MODEL_KINDS)}, got {self.models!r}")
        bad = [v for v in self.variant_list if ABLATIONS.get(v, ("",))[0] != "horizon" or v == "horizon"]
        if bad:
            raise ValueError(f"variants must name HorizonLM variants of bench quality, got {', '.join(bad)}")
        parts = [p.strip() for p in self.parts.split(",") if p.strip()]
        if not parts or set(parts) - set(SPEED_PARTS):
            raise ValueError(f"parts must name some of {', '.join(SPEED_PARTS)}, got {self.parts!r}")

    @property
    def model_list(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]

    @property
    def variant_list(self) -> list[str]:
        return [v.strip() for v in self.variants.split(",") if v.strip()]


PER_CHUNK_DECODER = {"graph_chunk_ends": False, "fill_frame_entries": 0}
"""The graphed decoder as it was before its defaults: chunk ends eager, a replay captured per
chunk while the memory fills (the decode rows ``horizon+per_chunk``)."""


def chunk_end_modules(model: nn.Module) -> list[nn.Module]:
    """HorizonLM's projections applied once per completed chunk, to its last token only: the
    supervisor's summary and GRU, the memory's key and value (per token when every token writes,
    the induction memory)."""
    if not isinstance(model, HorizonLM):
        return []
    out: list[nn.Module] = []
    if model.supervisor is not None:
        out += [model.supervisor.summary, model.supervisor.gru]
    if model.memory is not None and model.memory.kind == "chunk":
        out += [model.memory.key, model.memory.value]
    return out


def matmul_params(model: nn.Module) -> dict[str, float]:
    """Weights that take part in a matrix product, by how often they are applied.

    ``per_token``: every Linear applied to every token (the head once, even when tied to the
    embedding); ``per_chunk``: the chunk-end projections (:func:`chunk_end_modules`, GRU
    weights included), applied once per ``chunk_size`` tokens; ``effective`` = per_token +
    per_chunk / chunk_size, the per-token count behind every FLOP figure of this benchmark.
    """
    per_chunk_ids = {id(p) for m in chunk_end_modules(model) for p in m.parameters()}
    seen: set[int] = set()
    per_token = per_chunk = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            weights = [module.weight]
        elif isinstance(module, nn.RNNBase):
            weights = [p for name, p in module.named_parameters() if name.startswith("weight_")]
        else:
            continue
        for weight in weights:
            if id(weight) in seen:
                continue
            seen.add(id(weight))
            if id(weight) in per_chunk_ids:
                per_chunk += weight.numel()
            else:
                per_token += weight.numel()
    chunk = model.config.chunk_size if isinstance(model, HorizonLM) else 1
    return {"per_token": per_token, "per_chunk": per_chunk, "chunk_size": chunk,
            "effective": per_token + per_chunk / chunk}


def train_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6 x the effective matmul parameters per token; the baseline adds causal attention,
    6 * n_layers * D * L (half of full attention's 12 * n_layers * D * L, for the mask). The GLA
    peer's count is its matmuls alone: the products inside its chunked kernels are not counted."""
    flops = 6.0 * matmul_params(model)["effective"]
    if isinstance(model, TransformerLM):
        flops += 6.0 * model.config.n_layers * model.config.d_model * seq_len
    return flops


def flop_counts(preset: str, kinds: tuple[str, ...] = ("horizon", "transformer")) -> dict[str, dict[str, float]]:
    """Matmul parameters and FLOPs per token of the models (built on the meta device), the one
    source for the benchmark's JSON and the notes written from it."""
    out = {}
    with torch.device("meta"):
        models = {kind: _build(kind, preset, None) for kind in kinds}
    for kind, model in models.items():
        counts = matmul_params(model)
        out[kind] = {"parameters": sum(p.numel() for p in model.parameters()), "matmul_parameters": counts,
                     "forward_matmul_flops_per_token": 2.0 * counts["effective"],
                     "train_matmul_flops_per_token": 6.0 * counts["effective"]}
        if kind == "transformer":
            attention = 6.0 * model.config.n_layers * model.config.d_model
            out[kind]["train_attention_flops_per_token_per_context_token"] = attention
    return out


def mfu_peaks(ceilings: dict[str, Any] | None) -> dict[str, float | None]:
    """The peaks MFU is given against: quoted, measured in this run (None if not measured),
    datasheet."""
    return {"quoted": PEAK_BF16_FLOPS, "measured_matmul": (ceilings or {}).get("bf16_matmul_flops"),
            "datasheet_dense": DATASHEET_BF16_DENSE_FLOPS}


def mfu_columns(model_flops_per_s: float, peaks: dict[str, float | None]) -> dict[str, float | None]:
    """``mfu`` (against the quoted peak, as before) and beside it the same rate over the
    measured matmul ceiling and over the datasheet peak."""
    measured = peaks["measured_matmul"]
    return {"mfu": model_flops_per_s / peaks["quoted"],
            "mfu_vs_measured_matmul": model_flops_per_s / measured if measured else None,
            "mfu_vs_datasheet": model_flops_per_s / peaks["datasheet_dense"]}


def _build(kind: str, preset: str, device: torch.device | None) -> nn.Module:
    """``kind`` (a model kind, or a variant of ``bench quality``) at ``preset`` (on ``device``;
    None: where it was built)."""
    torch.manual_seed(0)
    base, overrides = (kind, {}) if kind in MODEL_KINDS else ABLATIONS[kind]
    model = build_model(base, {**MODEL_KINDS[base][1].preset(preset).to_dict(), **overrides})
    return model if device is None else model.to(device)


def _compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` every block of ``model`` in place (the ``+compile`` rows)."""
    for block in model.blocks:
        block.compile()


def _build_timed(kind: str, preset: str, device: torch.device) -> nn.Module:
    """:func:`_build` of a row's ``kind``, its blocks compiled when it ends in ``+compile``."""
    model = _build(kind.split("+")[0], preset, device)
    if kind.endswith("+compile"):
        _compile_blocks(model)
    return model


def _oom_guard(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement; out-of-memory and other failures become rows, not crashes."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as err:
        return {"status": "OOM", "error": str(err).split("\n")[0][:200]}
    except Exception as err:
        return {"status": "error", "error": f"{type(err).__name__}: {str(err)[:300]}"}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def measure_ceilings(device: torch.device) -> dict[str, Any]:
    """Copy bandwidth (read + write) and bf16 matmul rate, measured on this card."""
    n = 1 << 30
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    t = median(time_cuda(lambda: dst.copy_(src), 3, 10))
    bandwidth = 2 * src.numel() * 4 / t
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t_mm = median(time_cuda(lambda: a @ b, 3, 10))
    return {"copy_bandwidth_bytes_per_s": bandwidth, "bf16_matmul_flops": 2 * 8192**3 / t_mm}


def run_checks(device: torch.device) -> dict[str, Any]:
    """On the GPU: fast paths against their references, streaming against one call."""
    from horizonlm.bench.ssm import check_chunk_scan, check_s4d
    from horizonlm.ops.causal_conv import check_causal_conv
    from horizonlm.ops.topk_search import exact_topk, exact_topk_ref

    out: dict[str, Any] = {"chunk_scan_vs_twin_float32": check_chunk_scan(device),
                           "s4d_chunked_float32_vs_float64_recurrence": check_s4d(device, torch.float32),
                           "causal_conv_triton_vs_twin": check_causal_conv(device)}
    keys = F.normalize(torch.randn(50000, 128, device=device), dim=-1)
    queries = F.normalize(torch.randn(64, 128, device=device), dim=-1)
    _, idx = exact_topk(queries, keys, 8, key_block=7000)
    _, idx_ref = exact_topk_ref(queries, keys, 8)
    out["exact_topk_matches_bruteforce"] = bool((idx.sort(-1).values == idx_ref.sort(-1).values).all())
    out["count_cache_equals_cpu"] = check_count_cache_device(device)
    torch.manual_seed(0)
    model = HorizonLM(HorizonConfig.preset("small")).to(device)
    tokens = torch.randint(0, 256, (2, 3000), device=device)
    with torch.no_grad():
        full, _ = model(tokens)
        a, state = model(tokens[:, :1234])
        b, _ = model(tokens[:, 1234:], state)
        out["streaming_vs_one_call_float32_rel_err"] = ((torch.cat([a, b], 1) - full).norm() / full.norm()).item()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low, _ = model(tokens)
        out["bf16_autocast_vs_float32_logits_rel_err"] = ((low.float() - full).norm() / full.norm()).item()
    for name, check in (("graphed_decode_vs_eager", partial(check_graphed_decode, **PER_CHUNK_DECODER)),
                        ("graphed_decode_chunk_ends_vs_eager", check_graphed_decode),
                        ("graphed_decode_count_cache_vs_eager",
                         partial(check_graphed_decode, kind="horizon_count_cache", symbols=4)),
                        ("transformer_graphed_decode_vs_eager", check_graphed_transformer_decode)):
        try:
            out[f"{name}_max_rel_err"] = check(device)
        except Exception as err:
            out[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return out


def peer_checks(kind: str, device: torch.device) -> dict[str, Any]:
    """On the GPU, for a peer: its library's kernel against a float64 reference, forward and
    backward (:func:`horizonlm.peers.gla.check_gla_kernel`), and streaming against one call."""
    out: dict[str, Any] = {}
    if kind == "gla":
        try:
            out["gla_kernel_vs_float64_recurrence"] = check_gla_kernel(device)
        except Exception as err:
            out["gla_kernel_vs_float64_recurrence_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    try:
        model = _build(kind, "small", device)
        tokens = torch.randint(0, 256, (2, 3000), device=device)  # (B, T)
        with torch.no_grad():
            full, _ = model(tokens)  # (B, T, V)
            a, state = model(tokens[:, :1234])  # (B, 1234, V)
            b, _ = model(tokens[:, 1234:], state)  # (B, T - 1234, V)
            out[f"{kind}_streaming_vs_one_call_float32_rel_err"] = (
                (torch.cat([a, b], 1) - full).norm() / full.norm()).item()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                low, _ = model(tokens)  # (B, T, V)
            out[f"{kind}_bf16_autocast_vs_float32_logits_rel_err"] = ((low.float() - full).norm() / full.norm()).item()
    except Exception as err:
        out[f"{kind}_streaming_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return out


def check_graphed_decode(device: torch.device, preset: str = "small", prefix: int = 100, steps: int = 300,
                         kind: str = "horizon", symbols: int = 256, **decoder_options: Any) -> float:
    """Graphed HorizonLM steps (300 cross two chunk ends of the small preset) against eager
    steps, float32, no autocast: the worst relative error of the logits, over two runs: after
    ``prefix`` tokens (the memory filling: by default padded to full, one capture for every
    chunk; with :data:`PER_CHUNK_DECODER` a capture per chunk and eager chunk ends) and after
    ``prefix`` tokens more than the memory holds (full: one capture serves every chunk).
    ``kind``: the default or a variant of ``bench quality``; ``symbols``: the tokens drawn from the
    first that many ids (few make contexts recur, for a count cache). ``decoder_options`` go to
    :class:`GraphedDecoder`."""
    model = _build(kind, preset, device).eval()
    config = model.config
    full = config.memory_capacity * config.chunk_size + prefix if config.use_memory else prefix
    tokens = torch.randint(0, symbols, (2, full + steps), device=device)  # (B, T)
    worst = 0.0
    with torch.no_grad():
        for start in (prefix, full):
            _, state = model(tokens[:, :start])
            decoder = GraphedDecoder(model, state, bf16=False, **decoder_options)
            for t in range(start, start + steps):
                got = decoder.step(tokens[:, t : t + 1])  # (B, V)
                want, state = model(tokens[:, t : t + 1], state)  # (B, 1, V)
                worst = max(worst, ((got - want[:, -1]).norm() / want.norm()).item())
    return worst


def check_graphed_transformer_decode(device: torch.device, preset: str = "small", prefix: int = 100,
                                     steps: int = 300) -> float:
    """Graphed static-cache transformer steps against eager steps over the growing cache,
    float32, no autocast: the worst relative error of the logits (attention kernels differ
    between the masked full-capacity read and the unmasked one, so not exactly zero)."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig.preset(preset)).to(device).eval()
    tokens = torch.randint(0, 256, (2, prefix + steps), device=device)  # (B, T)
    with torch.no_grad():
        _, state = model(tokens[:, :prefix])
        decoder = GraphedTransformerDecoder(model, state, prefix + steps, bf16=False)
        worst = 0.0
        for t in range(prefix, prefix + steps):
            got = decoder.step(tokens[:, t : t + 1])  # (B, V)
            want, state = model(tokens[:, t : t + 1], state)  # (B, 1, V)
            worst = max(worst, ((got - want[:, -1]).norm() / want.norm()).item())
    return worst


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Callable[[], Tensor]) -> Callable[[], None]:
    """One bf16 training step a call on ``batch()`` (B, L + 1) tokens, the state carried from the
    call before (for a model that carries one)."""
    carried: dict[str, Any] = {"state": None}

    def step() -> None:
        tokens = batch()  # (B, L + 1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, new_state = model(tokens[:, :-1], carried["state"])  # (B, L, V)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        carried["state"] = new_state.detach() if carries_state(model) else None

    return step


def bench_train(kind: str, cfg: SpeedConfig, device: torch.device,
                peaks: dict[str, float | None] | None = None) -> list[dict[str, Any]]:
    """Training rows for ``kind`` (``horizon``, ``transformer`` or a peer, optionally ``+compile``)."""
    peaks = peaks or mfu_peaks(None)
    rows = []
    model = _build_timed(kind, cfg.preset, device)
    base = model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for length in parse_ints(cfg.train_lengths):
        batch = max(1, cfg.tokens_per_step // length)

        def run() -> dict[str, Any]:
            torch.cuda.reset_peak_memory_stats()
            tokens = torch.randint(0, 256, (batch, length + 1), device=device)  # (B, L + 1)
            step = _train_step(model, opt, lambda: tokens)
            times = time_cuda(step, cfg.warmup, cfg.repeat)
            t = median(times)
            tokens_per_s = batch * length / t
            flops = train_flops_per_token(base, length)
            return {"status": "ok", "seconds_per_step": t, "tokens_per_s": tokens_per_s,
                    "train_flops_per_token": flops, **mfu_columns(tokens_per_s * flops, peaks),
                    "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "all_seconds": times}

        row = {"part": "train", "model": kind, "seq_len": length, "batch": batch, **_oom_guard(run)}
        print(json.dumps({k: v for k, v in row.items() if k != "all_seconds"}), flush=True)
        rows.append(row)
    return rows


def bench_train_profile(cfg: SpeedConfig, device: torch.device, split: np.ndarray | None) -> list[dict[str, Any]]:
    """One training step of HorizonLM and of each of ``variants`` (eager, bf16, the first of
    ``train_lengths``, ``tokens_per_step`` tokens, the state carried from three steps before): its
    wall time, device ms per module kind (:func:`horizonlm.bench.prefill_profile.module_device_ms`:
    the forward's modules by name, ``total`` the whole step with backward and optimizer) and the
    kernels that take most: where a variant's extra step time goes. Tokens: ``split`` (the train
    split of ``profile_data``), one stream a row, read on from step to step, or random bytes."""
    from horizonlm.bench.prefill_profile import module_device_ms, top_kernels

    length = parse_ints(cfg.train_lengths)[0]
    batch = max(1, cfg.tokens_per_step // length)
    stride = 0 if split is None else len(split) // batch  # each row a stream of its own part of the split
    rows = []
    for kind in ["horizon", *cfg.variant_list]:
        model = _build(kind, cfg.preset, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        read = {"at": 0}

        def tokens() -> Tensor:
            if split is None:
                return torch.randint(0, 256, (batch, length + 1), device=device)  # (B, L + 1)
            at = read["at"]
            read["at"] += length
            starts = [b * stride + at for b in range(batch)]
            chunk = [torch.from_numpy(split[s:s + length + 1].astype("int64")) for s in starts]
            return torch.stack(chunk).to(device)  # (B, L + 1)

        step = _train_step(model, opt, tokens)
        for _ in range(3):
            step()
        before = torch.cuda.memory_stats(device)
        times = time_cuda(step, 0, 3)
        after = torch.cuda.memory_stats(device)
        # the caching allocator's trips to the driver in those 3 steps (each cudaFree synchronizes the device)
        allocator = {key: after.get(key, 0) - before.get(key, 0)
                     for key in ("num_device_alloc", "num_device_free", "num_alloc_retries")}
        row = {"part": "train_profile", "model": kind, "seq_len": length, "batch": batch,
               "tokens": cfg.profile_data or "random bytes", "step_ms": [1000 * t for t in times],
               "allocator_in_timed_steps": allocator,
               "modules_ms": module_device_ms(model, step, device), "kernels": top_kernels(step, device)}
        print(json.dumps({k: row[k] for k in ("model", "step_ms", "modules_ms")}), flush=True)
        rows.append(row)
        del model, opt, step
        gc.collect()
        torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def _prefill(model: nn.Module, length: int, window: int, device: torch.device, state=None):
    gen = torch.Generator(device=device).manual_seed(length)
    for start in range(0, length, window):
        n = min(window, length - start)
        tokens = torch.randint(0, 256, (1, n), device=device, generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, state = model(tokens, state)
    return state


def bench_prefill(kind: str, cfg: SpeedConfig, device: torch.device) -> list[dict[str, Any]]:
    """Prefill rows for ``kind`` (``horizon``, ``transformer`` or a peer, optionally ``+compile``)."""
    rows = []
    model = _build_timed(kind, cfg.preset, device).eval()
    _prefill(model, min(cfg.prefill_window, 8192) * 2, min(cfg.prefill_window, 8192), device)  # warm-up
    for length in parse_ints(cfg.prefill_lengths):
        if kind.startswith("transformer") and length > cfg.transformer_prefill_max:
            rows.append({"part": "prefill", "model": kind, "seq_len": length, "batch": 1, "status": "not run",
                         "reason": f"beyond transformer_prefill_max={cfg.transformer_prefill_max}: quadratic time"})
            continue
        window = cfg.prefill_window if carries_state(model) else length

        def run() -> dict[str, Any]:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _prefill(model, length, window, device)
            torch.cuda.synchronize()
            t = time.perf_counter() - t0
            return {"status": "ok", "seconds": t, "tokens_per_s": length / t, "window": window,
                    "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}

        row = {"part": "prefill", "model": kind, "seq_len": length, "batch": 1, **_oom_guard(run)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def whole_chunks_mean(times: list[float], start_pos: int, chunk: int) -> float | None:
    """Mean seconds per step over the whole chunks of a decode run, from the second chunk the run
    touches on (the first carries first-time work: kernel compilation, workspaces): what a long
    generation pays per token, each chunk's chunk-end step included (and its graph capture, while
    the memory fills). Step i feeds the token at stream position ``start_pos + i``. None when no
    whole chunk follows."""
    first = (-start_pos) % chunk or chunk  # the first step of the second chunk touched
    whole = (len(times) - first) // chunk
    if whole < 1:
        return None
    return sum(times[first : first + whole * chunk]) / (whole * chunk)


def _decode_times(kind: str, model: nn.Module, state, cfg: SpeedConfig, device: torch.device
                  ) -> tuple[list[float], dict[str, Any]]:
    """Per-step seconds of one decode row and what describes how it ran."""
    token = torch.zeros(state.batch_size, 1, dtype=torch.long, device=device)  # (B, 1)
    if kind in ("horizon", "horizon+per_chunk") or kind in cfg.variant_list:
        per_chunk = kind == "horizon+per_chunk"
        decoder = GraphedDecoder(model, state, **(PER_CHUNK_DECODER if per_chunk else {}))
        times = time_cuda(lambda: decoder.step(token), 0, cfg.decode_steps)
        amortized = whole_chunks_mean(times, state.pos, model.config.chunk_size)
        return times, {"graphed": True, "graph_captures": decoder.captures, "eager_steps": decoder.eager_steps,
                       "chunk_end_captures": decoder.end_captures,
                       "mode": ("CUDA graph per chunk until the memory is full, then one for all; chunk-end steps "
                                "eager" if per_chunk else
                                "one CUDA graph for every chunk (a filling memory padded to full size) and one for "
                                "the chunk-end step")
                               + "; captures inside the timed steps",
                       "whole_chunks_ms_per_token": None if amortized is None else 1000 * amortized,
                       "whole_chunks": "mean over the whole chunks after the first one touched, each with its "
                                       "chunk-end step (and its graph capture while the memory fills)"}
    if kind == "transformer":
        decoder = GraphedTransformerDecoder(model, state, state.pos + cfg.decode_steps)
        times = time_cuda(lambda: decoder.step(token), 0, cfg.decode_steps)
        return times, {"graphed": True, "graph_captures": decoder.captures, "cache_capacity": decoder.cache.capacity,
                       "mode": "CUDA graph over a static KV cache, its capture inside the timed steps"}
    holder = {"s": state}

    @torch.no_grad()
    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, holder["s"] = model(token, holder["s"])

    times = time_cuda(step, 3, cfg.transformer_decode_steps)
    return times, {"graphed": False,
                   "mode": "eager, KV cache concatenated, token check syncs the host: not like for like"}


def bench_decode(kind: str, cfg: SpeedConfig, device: torch.device) -> list[dict[str, Any]]:
    """Decode rows for ``kind``: ``horizon`` and ``transformer`` graphed (the decoders' defaults),
    ``horizon+per_chunk`` (:data:`PER_CHUNK_DECODER`: a replay per chunk while the memory fills,
    chunk ends eager), ``transformer+eager``;
    a peer's say not run (no graphed decoder here: an eager one would not compare like for like)."""
    rows = []
    base_kind = kind.split("+")[0]
    if base_kind not in ("horizon", "transformer") and kind not in cfg.variant_list:
        return [{"part": "decode", "model": kind, "context": context, "batch": batch, "status": "not run",
                 "reason": "no graphed decoder for this peer"}
                for context in parse_ints(cfg.decode_contexts) for batch in parse_ints(cfg.decode_batches)]
    model = _build(base_kind, cfg.preset, device).eval()
    for context in parse_ints(cfg.decode_contexts):
        if base_kind == "transformer" and context > cfg.transformer_prefill_max:
            for batch in parse_ints(cfg.decode_batches):
                rows.append({"part": "decode", "model": kind, "context": context, "batch": batch, "status": "not run",
                             "reason": "building the cache needs a prefill beyond transformer_prefill_max"})
            continue
        window = context if base_kind == "transformer" else cfg.prefill_window
        try:
            base_state = _prefill(model, context, window, device)
        except torch.cuda.OutOfMemoryError as err:
            rows.append({"part": "decode", "model": kind, "context": context, "status": "OOM", "error": str(err)[:200]})
            continue
        for batch in parse_ints(cfg.decode_batches):

            def run() -> dict[str, Any]:
                state = base_state.expand(batch) if batch > 1 else base_state
                torch.cuda.reset_peak_memory_stats()
                times, how = _decode_times(kind, model, state, cfg, device)
                return {"status": "ok", "ms_per_token_step": 1000 * median(times),
                        "mean_ms_per_token_step": 1000 * sum(times) / len(times), "steps": len(times), **how,
                        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}

            row = {"part": "decode", "model": kind, "context": context, "batch": batch, **_oom_guard(run)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        base_state = None  # free the context's state before the next one is built
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def bench_prefill_profile(cfg: SpeedConfig, device: torch.device) -> dict[str, Any]:
    """One prefill window of HorizonLM (``prefill_window`` tokens, batch 1, bf16) after seven
    windows have filled the memory: device ms per module kind and the kernels that take most
    (:mod:`horizonlm.bench.prefill_profile`), eager, then with every block compiled."""
    from horizonlm.bench.prefill_profile import module_device_ms, top_kernels

    model = _build("horizon", cfg.preset, device).eval()
    window = cfg.prefill_window
    state = _prefill(model, 7 * window, window, device)
    tokens = torch.randint(0, 256, (1, window), device=device)  # (1, W)

    @torch.no_grad()
    def run() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(tokens, state)

    run()
    result: dict[str, Any] = {"window": window, "context_before": 7 * window, "batch": 1,
                              "eager": {"modules_ms": module_device_ms(model, run, device),
                                        "kernels": top_kernels(run, device)}}
    print(json.dumps(result), flush=True)
    _compile_blocks(model)
    run()
    run()
    times = time_cuda(run, 0, 3)
    result["compiled"] = {"window_ms": [1000 * t for t in times], "kernels": top_kernels(run, device)}
    print(json.dumps(result["compiled"]), flush=True)
    return result


def bench_decode_profile(cfg: SpeedConfig, device: torch.device) -> list[dict[str, Any]]:
    """HorizonLM's decode step profiled at batch 1 after each of ``decode_contexts`` tokens
    (:func:`horizonlm.bench.decode_profile.profile_decode`): kernels, their device time and the
    wall time (with and without the profiler) of a replayed step, of a step that captures its
    chunk's graph and of a chunk-end step."""
    from horizonlm.bench.decode_profile import profile_decode

    model = _build("horizon", cfg.preset, device).eval()
    rows = []
    for context in parse_ints(cfg.decode_contexts):
        state = _prefill(model, context, cfg.prefill_window, device)
        row = {"part": "decode_profile", "model": "horizon", "context": context, "batch": 1,
               **profile_decode(model, state, steps=2 * model.config.chunk_size)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        state = None
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def bench_memory_search(cfg: SpeedConfig, device: torch.device, bandwidth: float | None) -> list[dict[str, Any]]:
    from horizonlm.ops.topk_search import exact_topk

    rows = []
    dim = HorizonConfig.preset(cfg.preset).memory_dim
    plan = [(size, parse_ints(cfg.memory_queries)) for size in parse_ints(cfg.memory_sizes)]
    plan += [(size, [cfg.memory_large_queries]) for size in parse_ints(cfg.memory_large_sizes)]
    for size, query_counts in plan:
        def run_size() -> list[dict[str, Any]]:
            keys = torch.empty(size, dim, device=device, dtype=torch.bfloat16)  # (M, Dk)
            for start in range(0, size, 1 << 24):
                n = min(1 << 24, size - start)
                keys[start : start + n] = F.normalize(torch.randn(n, dim, device=device), dim=-1)
            out = []
            for q in query_counts:
                queries = F.normalize(torch.randn(q, dim, device=device), dim=-1).to(torch.bfloat16)
                block = max(1, min(size, (1 << 31) // (4 * q)))  # score block at most 2 GiB
                t = median(time_cuda(lambda: exact_topk(queries, keys, 8, key_block=block), 2, 10))
                floor = size * dim * 2 / bandwidth if bandwidth else None
                out.append({"part": "memory_search", "entries": size, "queries": q, "top_k": 8, "status": "ok",
                            "ms": 1000 * t, "ms_per_query": 1000 * t / q,
                            "bandwidth_floor_ms": None if floor is None else 1000 * floor})
            return out

        try:
            result = run_size()
        except torch.cuda.OutOfMemoryError as err:
            result = [{"part": "memory_search", "entries": size, "status": "OOM", "error": str(err)[:200]}]
        gc.collect()
        torch.cuda.empty_cache()
        for row in result:
            print(json.dumps(row), flush=True)
        rows.extend(result)
    return rows


def run_speed(cfg: SpeedConfig) -> dict[str, Any]:
    out = refuse_existing(cfg.out, cfg.overwrite)  # before anything runs: the file is written after the first part
    parts = {p.strip() for p in cfg.parts.split(",")}
    # a missing or broken corpus is refused here, not after the parts before the profile have run
    profile_split = open_split(cfg.profile_data, "train") if "train_profile" in parts and cfg.profile_data else None
    if not torch.cuda.is_available():
        raise HorizonError("horizon bench speed needs a CUDA GPU (torch sees none here)")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict[str, Any] = {"environment": environment(), "config": asdict(cfg), "rows": []}
    models = cfg.model_list
    results["flops"] = flop_counts(cfg.preset, tuple(models))
    results["parameters"] = {kind: counts["parameters"] for kind, counts in results["flops"].items()}

    def save() -> None:
        atomic_write_json(out, results)

    if "ceilings" in parts:
        results["ceilings"] = measure_ceilings(device)
        print(json.dumps(results["ceilings"]), flush=True)
    peaks = mfu_peaks(results.get("ceilings"))
    results["mfu_peaks_flops"] = peaks
    print(json.dumps({"mfu_peaks_flops": peaks, "flops": results["flops"]}), flush=True)
    if "checks" in parts:
        torch.backends.cuda.matmul.allow_tf32 = False  # the checks compare float32 paths without TF32
        try:
            results["checks"] = run_checks(device) if {"horizon", "transformer"} & set(models) else {}
        except Exception as err:
            results["checks"] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
        for kind in models:
            if kind not in ("horizon", "transformer"):
                results["checks"].update(peer_checks(kind, device))
        torch.backends.cuda.matmul.allow_tf32 = True
        print(json.dumps(results["checks"]), flush=True)
        save()
    benches = (("train", lambda kind: bench_train(kind, cfg, device, peaks)),
               ("prefill", lambda kind: bench_prefill(kind, cfg, device)),
               ("decode", lambda kind: bench_decode(kind, cfg, device)))
    for part, fn in benches:
        if part in parts:
            kinds = list(models)
            if part in ("train", "prefill") and cfg.compile:
                kinds += [f"{k}+compile" for k in models if k in ("horizon", "transformer")]
            if part in ("train", "decode"):
                kinds += cfg.variant_list
            if part == "decode" and "horizon" in models:
                kinds += ["horizon+per_chunk"]
            if part == "decode" and "transformer" in models:
                kinds += ["transformer+eager"]
            for kind in kinds:
                results["rows"].extend(fn(kind))
                save()
    if "train_profile" in parts:
        results["train_profile"] = bench_train_profile(cfg, device, profile_split)
        save()
    if "prefill_profile" in parts and "horizon" in models:
        results["prefill_profile"] = bench_prefill_profile(cfg, device)
        save()
    if "decode_profile" in parts and "horizon" in models:
        results["decode_profile"] = bench_decode_profile(cfg, device)
        save()
    if "memory" in parts:
        bandwidth = results.get("ceilings", {}).get("copy_bandwidth_bytes_per_s")
        results["rows"].extend(bench_memory_search(cfg, device, bandwidth))
    save()
    plot_speed(results, out.with_suffix(".png"))
    return results


def plot_speed(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    panels = (("train", "seq_len", "tokens_per_s", "training tokens/s", "sequence length (tokens)"),
              ("train", "seq_len", "peak_memory_gib", "training peak memory (GiB)", "sequence length (tokens)"),
              ("prefill", "seq_len", "seconds", "prefill seconds (batch 1)", "sequence length (tokens)"),
              ("decode", "context", "ms_per_token_step", "decode ms per step (median, batch 1)", "context (tokens)"))
    for ax, (part, x, y, title, xlabel) in zip(axes, panels):
        styles = {"horizon": "o-", "transformer": "s--", "horizon+compile": "o:", "transformer+compile": "s:",
                  "horizon+per_chunk": "o-.", "transformer+eager": "x:"}
        peers = sorted({r["model"] for r in rows} - set(styles))
        for kind, marker in [*styles.items(), *((peer, "^-.") for peer in peers)]:
            pts = sorted((r[x], r[y]) for r in rows
                         if r["part"] == part and r["model"] == kind and (part != "decode" or r["batch"] == 1))
            if pts:
                ax.plot(*zip(*pts), marker, label=kind)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend()
    env = results["environment"]
    fig.suptitle(f"{env.get('device')} | torch {env.get('torch')} | {results['config']['preset']} preset")
    fig.tight_layout()
    save_figure(fig, path)
