"""``horizon bench memory``: recall, latency, size and build time of every memory-store backend;
with ``--read``, the in-model top-K memory read's selection (``ops.topk_read``) checked and timed.

Keys are random unit vectors of the model's key width: with no cluster structure this is the
hard case for approximate search (keys a trained model writes are likely easier). Recall@k is
measured against the exact torch search on the same keys and queries.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from horizonlm.bench.common import (
    environment,
    median,
    parse_ints,
    relative_error,
    save_figure,
    time_cuda,
)
from horizonlm.errors import HorizonError
from horizonlm.fileio import atomic_write_json, existing_file
from horizonlm.memory.store import MemoryStore, StoreConfig


@dataclass
class MemoryBenchConfig:
    """Settings of ``horizon bench memory``."""

    out: str = "bench/results/memory.json"
    """Where the JSON goes (the PNG lands beside it). Each part (the CPU stores, --gpu, --read) is
    a section of it: a section the file lacks is added beside the others, one it holds is refused
    unless --overwrite."""
    overwrite: bool = False
    """Replace this part's section of an existing results file (the other sections are kept)."""
    dim: int = 128
    """Key width (the base preset's memory_dim)."""
    sizes: str = "10000,100000,1000000,10000000"
    """Store sizes (entries)."""
    backends: str = "torch,faiss_flat,faiss_ivf_flat,faiss_ivf_pq,faiss_hnsw"
    """Backends to measure."""
    hnsw_max: int = 100000
    """Largest store HNSW is built for (its build time grows fastest on two cores)."""
    flat_max: int = 10000000
    """Largest store the flat (exact) backends are measured at."""
    queries: int = 1024
    """Batch size of the batched-latency and recall measurement."""
    top_k: int = 8
    """k of recall@k."""
    gpu_sizes: str = "1000000,10000000,100000000"
    """With --gpu: exact torch search sizes on the GPU (bf16 keys)."""
    gpu_queries: int = 64
    """With --gpu: query batch."""
    gpu: bool = False
    """Run the GPU part (exact search, ingest throughput) instead of the CPU part."""
    ingest_tokens: int = 10_000_000
    """With --gpu: tokens streamed into a saved context to measure ingest throughput."""
    read: bool = False
    """Run the top-K memory read part instead: the selection the read uses (the Triton kernel on
    CUDA) checked against the dense torch selection, then both timed; results under "read"."""
    read_device: str = "auto"
    """With --read: ``auto``, ``cuda`` or ``cpu`` (the CPU runs the torch twin, at small sizes only)."""
    read_queries: int = 65536
    """With --read: query tokens of the timed read."""
    read_entries: int = 1048576
    """With --read: memory entries of the timed read, every one visible to every query."""
    read_dims: str = "128,64"
    """With --read: key widths (memory_dim)."""
    read_topks: str = "8,32"
    """With --read: K of the top-K read."""
    read_dtypes: str = "float32,bfloat16"
    """With --read: dtypes of the queries and keys."""
    read_dense_queries: int = 8192
    """With --read: queries the dense path is timed on, in blocks of 1024 as memory_read reads;
    its time is scaled to read_queries (the dense path's cost is linear in the queries)."""
    read_check_queries: int = 4096
    """With --read: queries of the check against the dense selection (batch 2, windows of 256
    chunks over read_check_entries entries, 64 per chunk)."""
    read_check_entries: int = 65536
    """With --read: entries of the check."""
    read_tiles: str = ""
    """With --read on CUDA: kernel tiles ``QxE`` (queries x entries per program, powers of two
    >= 16; e.g. ``64x128,128x64,128x128``) timed at the timed read's size beside the default
    tile, each checked to select what the default tile selects (results under "tiles")."""


def _store_config(backend: str, size: int) -> StoreConfig:
    nlist = 256 if size <= 100_000 else (1024 if size <= 1_000_000 else 4096)
    return StoreConfig(backend=backend, nlist=nlist, nprobe=max(16, nlist // 16), pq_m=32, hnsw_m=32,
                       hnsw_ef_search=128, key_block=1 << 16)


def _random_keys(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dim)
    for start in range(0, n, 1 << 20):
        m = min(1 << 20, n - start)
        out[start : start + m] = F.normalize(torch.randn(m, dim, generator=g), dim=-1)
    return out


def bench_cpu(cfg: MemoryBenchConfig) -> list[dict[str, Any]]:
    rows = []
    for size in parse_ints(cfg.sizes):
        keys = _random_keys(size, cfg.dim, seed=size)
        queries = _random_keys(cfg.queries, cfg.dim, seed=size + 1)
        truth = None
        for backend in cfg.backends.split(","):
            row: dict[str, Any] = {"entries": size, "backend": backend, "dim": cfg.dim}
            if backend == "faiss_hnsw" and size > cfg.hnsw_max:
                rows.append({**row, "status": "not run", "reason": f"HNSW build above hnsw_max={cfg.hnsw_max} "
                             "takes too long on this CPU"})
                continue
            if backend in ("torch", "faiss_flat") and size > cfg.flat_max:
                rows.append({**row, "status": "not run", "reason": f"above flat_max={cfg.flat_max}"})
                continue
            store_cfg = _store_config(backend, size)
            store = MemoryStore(cfg.dim, 1, store_cfg)
            t0 = time.perf_counter()
            if backend in ("faiss_ivf_flat", "faiss_ivf_pq"):
                # train the coarse cells (and codebooks) on a sample, then add everything
                sample = keys[torch.randperm(size, generator=torch.Generator().manual_seed(0))[: 64 * store_cfg.nlist]]
                store.index.train(sample.numpy())
            store.add(keys, torch.zeros(size, 1), torch.arange(size))
            build = time.perf_counter() - t0
            _, got = store.search(queries, cfg.top_k)
            if backend == "torch":
                truth = got
            big = size >= 1_000_000
            one = median([_timed(lambda: store.search(queries[i : i + 1], cfg.top_k)) for i in range(5 if big else 20)])
            batch = median([_timed(lambda: store.search(queries, cfg.top_k)) for _ in range(1 if big else 3)])
            recall = None
            if truth is not None:
                hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, truth))
                recall = hits / truth.numel()
            size_bytes = store.bytes_per_entry() * size
            if backend in ("faiss_ivf_flat", "faiss_ivf_pq"):
                size_bytes += store_cfg.nlist * cfg.dim * 4  # coarse centroids
            if backend == "faiss_ivf_pq":
                size_bytes += 256 * cfg.dim * 4  # PQ codebooks: 256 centroids per sub-vector
            row.update(status="ok", build_seconds=build, recall_at_k=recall, top_k=cfg.top_k,
                       ms_one_query=1000 * one, ms_batch=1000 * batch, queries_in_batch=cfg.queries,
                       ms_per_query_batched=1000 * batch / cfg.queries, bytes_per_entry=size_bytes / size,
                       config={k: v for k, v in asdict(store_cfg).items() if k != "key_block"})
            print(json.dumps(row), flush=True)
            rows.append(row)
            store = None  # free this backend's copy before the next is built
            gc.collect()
        keys = None
        gc.collect()
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_gpu(cfg: MemoryBenchConfig) -> list[dict[str, Any]]:
    """Exact search on the GPU at large sizes (bf16 keys), and ingest throughput."""
    from horizonlm.ops.topk_search import exact_topk

    device = torch.device("cuda")
    rows = []
    for size in parse_ints(cfg.gpu_sizes):
        keys = torch.empty(size, cfg.dim, device=device, dtype=torch.bfloat16)  # (M, Dk)
        for start in range(0, size, 1 << 24):
            n = min(1 << 24, size - start)
            keys[start : start + n] = F.normalize(torch.randn(n, cfg.dim, device=device), dim=-1)
        queries = F.normalize(torch.randn(cfg.gpu_queries, cfg.dim, device=device), dim=-1).to(torch.bfloat16)
        block = min(size, (1 << 31) // (4 * cfg.gpu_queries))
        t = median(time_cuda(lambda: exact_topk(queries, keys, cfg.top_k, key_block=block), 2, 10))
        row = {"part": "gpu_exact_search", "entries": size, "queries": cfg.gpu_queries, "ms": 1000 * t,
               "key_bytes": keys.numel() * 2}
        print(json.dumps(row), flush=True)
        rows.append(row)
        keys = None
        torch.cuda.empty_cache()
    rows.append(_gpu_ingest(cfg))
    return rows


def _gpu_ingest(cfg: MemoryBenchConfig) -> dict[str, Any]:
    from horizonlm import HorizonConfig, HorizonLM
    from horizonlm.checkpoint import save_checkpoint
    from horizonlm.ingest import IngestConfig, ingest

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        save_checkpoint(root / "ckpt", 0, HorizonLM(HorizonConfig.preset("base")), {"tokenizer": {"kind": "byte"}})
        data = root / "stream.bin"
        g = torch.Generator().manual_seed(0)
        data.write_bytes(torch.randint(32, 127, (cfg.ingest_tokens,), generator=g, dtype=torch.uint8).numpy().tobytes())
        result = ingest([str(data)], IngestConfig(checkpoint=str(root / "ckpt"), context=str(root / "ctx"),
                                                  window=131072, save_every=cfg.ingest_tokens, device="cuda",
                                                  progress=False))
    row = {"part": "gpu_ingest", "model": "base (untrained weights; speed does not depend on them)", **result}
    print(json.dumps(row), flush=True)
    return row


_CPU_READ_LIMIT = 1 << 24
"""Largest queries x entries the read part takes on the CPU (a smoke test, not a timing)."""


def _unit(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return F.normalize(torch.randn(shape, generator=g, device=device), dim=-1).to(dtype)


def _dense_blocks(q: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor, seen: torch.Tensor, capacity: int,
                  k: int, block: int = 1024) -> None:
    """The dense selection as memory_read ran it before ops.topk_read: one (B, block, M) score
    matrix per block of queries."""
    from horizonlm.ops.topk_read import topk_visible_dense

    for start in range(0, q.shape[1], block):
        topk_visible_dense(q[:, start : start + block], keys, ids, seen[start : start + block], capacity, k)


def _same_selection(got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """How far the fast selection is from the dense one: the share of (row, token) whose chosen
    set of entries is the same (order within the K does not matter; -inf slots count as -1), the
    share of equal -inf slots, the largest score difference (both sorted descending)."""
    sets = [torch.where(torch.isfinite(s), i, -1).sort(dim=-1).values for s, i in (got, ref)]  # (B, L, K) twice
    finite = torch.isfinite(ref[0])  # (B, L, K)
    diff = (got[0].float() - ref[0].float()).abs()[finite]  # (F,)
    return {"same_set_fraction": (sets[0] == sets[1]).all(-1).float().mean().item(),
            "same_padding": bool(torch.equal(torch.isfinite(got[0]), finite)),
            "max_abs_score_diff": diff.max().item() if diff.numel() else 0.0,
            "finite_slots": int(finite.sum())}


def _read_path_check(dtype: torch.dtype, device: torch.device, batch: int = 2, length: int = 4096, seed: int = 7,
                     carried: int = 8192, chunk: int = 128, capacity: int = 64, k: int = 8,
                     dim: int = 128) -> dict[str, Any]:
    """The whole read as the base model runs it in training (one window of ``length`` tokens after
    ``carried`` entries, one entry per token, ``capacity`` chunks of ``chunk`` visible, the null
    entry), through the fast selection and through the dense reference in ``dtype``, each against
    the dense read in float64 of the same inputs: the relative error of the reads and of the
    gradients of queries, keys and values. In float32 the fast path must match (1e-3); in a
    16-bit dtype both paths round, so the fast path must be no further from float64 than the dense
    one (a dense bf16 read rounds every score to bf16; measured on a CPU, the fast path's
    gradients were about twice as close)."""
    from horizonlm.ops.chunks import chunk_layout
    from horizonlm.ops.memory_read import memory_read

    g = torch.Generator(device=device).manual_seed(seed)
    layout = chunk_layout(carried, length, chunk, device)
    ids = torch.cat([torch.arange(carried, device=device) // chunk, layout.completed_before])  # (M,)
    q = F.normalize(torch.randn(batch, length, dim, generator=g, device=device), dim=-1).to(dtype)  # (B, L, Dk)
    keys = F.normalize(torch.randn(batch, carried + length, dim, generator=g, device=device), dim=-1)  # (B, M, Dk)
    keys[:, carried:] = q  # the window's own contexts again: exact matches, as repeated text makes
    keys = keys.to(dtype)  # (B, M, Dk)
    values = torch.randn(batch, carried + length, dim, generator=g, device=device).to(dtype)  # (B, M, Dv)
    g_out = torch.randn(batch, length, dim, generator=g, device=device).to(dtype)  # (B, L, Dv)
    null = torch.tensor([0.5], device=device)  # (1,)

    def run(reference: bool, as_dtype: torch.dtype) -> list[torch.Tensor]:
        inputs = [t.to(as_dtype).clone().requires_grad_() for t in (q, keys, values)]
        read = memory_read(*inputs, ids, layout.completed_before, capacity, k, 10.0, 4096, null,
                           reference=reference)  # (B, L, Dv)
        return [read, *torch.autograd.grad((read * g_out.to(as_dtype)).sum(), inputs)]

    exact = run(True, torch.float64)
    names = ("read", "grad_q", "grad_keys", "grad_values")
    fast = {name: relative_error(a.double(), b) for name, a, b in zip(names, run(False, dtype), exact)}
    dense = {name: relative_error(a.double(), b) for name, a, b in zip(names, run(True, dtype), exact)}
    row = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "queries": length,
           "entries": carried + length, "capacity_chunks": capacity, "chunk": chunk, "top_k": k, "dim": dim,
           "against": "the dense read in float64 of the same inputs",
           **{f"{name}_rel_err": v for name, v in fast.items()},
           **{f"dense_{name}_rel_err": v for name, v in dense.items()}}
    row["ok"] = all(fast[n] < 1e-3 if dtype == torch.float32 else fast[n] <= 1.1 * dense[n] + 1e-3 for n in names)
    print(json.dumps({"part": "read_path_check", **row}), flush=True)
    return row


def bench_read(cfg: MemoryBenchConfig) -> dict[str, Any]:
    """The top-K memory read's selection: the dispatching ``topk_visible`` (the Triton kernel on
    CUDA, the torch twin elsewhere) against the dense torch selection; the whole read
    (``memory_read``: reads and gradients) through it against the dense reference at the base
    model's training shape; then the selection timed against the dense blocked path at
    ``read_queries`` x ``read_entries``."""
    from horizonlm.devices import resolve_device
    from horizonlm.ops import topk_read

    device = resolve_device(cfg.read_device)
    tiles = _parse_tiles(cfg.read_tiles)
    if tiles and (device.type != "cuda" or topk_read.triton is None):
        raise HorizonError("--read-tiles times the Triton kernel's tiles and needs a CUDA device with triton")
    sizes = [cfg.read_queries * cfg.read_entries, 2 * cfg.read_check_queries * cfg.read_check_entries]
    if device.type != "cuda" and max(sizes) > _CPU_READ_LIMIT:
        raise HorizonError(f"bench memory --read times the Triton kernel and needs a CUDA device at these sizes; "
                           f"on the {device.type} (the torch twin) keep queries x entries <= {_CPU_READ_LIMIT} "
                           "(--read-queries, --read-entries, --read-check-queries, --read-check-entries, "
                           "--read-dense-queries)")
    kernel = topk_read.triton is not None and device.type == "cuda"
    out: dict[str, Any] = {"selection": "triton kernel" if kernel else "torch twin", "checks": [], "rows": []}
    if kernel:
        out.update(block_l=topk_read._BLOCK_L, block_m=topk_read._BLOCK_M, float32_products=topk_read._PRECISION,
                   triton=topk_read.triton.__version__)
    dtypes = [getattr(torch, name) for name in cfg.read_dtypes.split(",")]
    chunk, window = 64, 256
    n_check, m_check = cfg.read_check_queries, cfg.read_check_entries
    check_ids = torch.arange(m_check, device=device) // chunk  # (M,): one entry per token, 64 per chunk
    check_seen = torch.linspace(0, m_check // chunk + 8, n_check, device=device).long()  # (L,) ascending
    for dtype in dtypes:
        for dim in parse_ints(cfg.read_dims):
            q = _unit((2, n_check, dim), dtype, device, seed=dim)  # (B, L, Dk)
            keys = _unit((2, m_check, dim), dtype, device, seed=dim + 1)  # (B, M, Dk)
            for k in parse_ints(cfg.read_topks):
                got = topk_read.topk_visible(q, keys, check_ids, check_seen, window, k)
                ref = topk_read.topk_visible_dense(q.float(), keys.float(), check_ids, check_seen, window, k)
                row = {"dtype": str(dtype).removeprefix("torch."), "dim": dim, "top_k": k, "queries": n_check,
                       "entries": m_check, "window_entries": window * chunk, **_same_selection(got, ref)}
                row["ok"] = row["same_padding"] and row["same_set_fraction"] > 0.999 and row["max_abs_score_diff"] < 1e-3
                print(json.dumps({"part": "read_check", **row}), flush=True)
                out["checks"].append(row)
    shape = {} if device.type == "cuda" else {"length": 200, "carried": 300, "chunk": 16, "capacity": 8, "dim": 16}
    out["read_path_checks"] = [_read_path_check(dtype, device, **shape) for dtype in dtypes]
    n, m = cfg.read_queries, cfg.read_entries
    ids = torch.arange(m, device=device)  # (M,)
    seen = torch.full((n,), m, device=device)  # (L,): every entry visible to every query
    dense_n = min(cfg.read_dense_queries, n)
    for dtype in dtypes:
        for dim in parse_ints(cfg.read_dims):
            q = _unit((1, n, dim), dtype, device, seed=2 * dim)  # (1, L, Dk)
            keys = _unit((1, m, dim), dtype, device, seed=2 * dim + 1)  # (1, M, Dk)
            for k in parse_ints(cfg.read_topks):
                fast = median(time_cuda(lambda: topk_read.topk_visible(q, keys, ids, seen, m, k), 1, 3))
                dense = median(time_cuda(lambda: _dense_blocks(q[:, :dense_n], keys, ids, seen[:dense_n], m, k), 1, 2))
                row = {"dtype": str(dtype).removeprefix("torch."), "dim": dim, "top_k": k, "queries": n,
                       "entries": m, "ms": 1000 * fast, "dense_ms": 1000 * dense * n / dense_n,
                       "dense_queries_timed": dense_n}
                row["speedup"] = row["dense_ms"] / row["ms"]
                print(json.dumps({"part": "read_time", **row}), flush=True)
                out["rows"].append(row)
            if tiles:
                out.setdefault("tiles", []).extend(_time_tiles(q, keys, ids, seen, tiles, parse_ints(cfg.read_topks)))
            q = keys = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def _parse_tiles(text: str) -> list[tuple[int, int]]:
    """``"64x128,128x64"`` -> [(64, 128), (128, 64)]; each side a power of two >= 16."""
    tiles = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        sides = item.lower().split("x")
        if len(sides) != 2 or not all(side.isdigit() for side in sides):
            raise HorizonError(f"--read-tiles: {item!r} is not QUERIESxENTRIES (e.g. 128x64)")
        block_l, block_m = map(int, sides)
        if any(n < 16 or n & (n - 1) for n in (block_l, block_m)):
            raise HorizonError(f"--read-tiles: {item!r} needs powers of two >= 16 on both sides")
        tiles.append((block_l, block_m))
    return tiles


def _time_tiles(q: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor, seen: torch.Tensor,
                tiles: list[tuple[int, int]], topks: list[int]) -> list[dict[str, Any]]:
    """The kernel at each tile against its default tile on the same inputs: the selection compared
    and the time. A tile the compiler or the device refuses is recorded with its error."""
    from horizonlm.ops import topk_read

    rows = []
    for k in topks:
        base = topk_read.topk_visible_triton(q, keys, ids, seen, keys.shape[1], k)  # (1, L, K) twice
        for block_l, block_m in tiles:
            row = {"dtype": str(q.dtype).removeprefix("torch."), "dim": q.shape[-1], "top_k": k,
                   "queries": q.shape[1], "entries": keys.shape[1], "block_l": block_l, "block_m": block_m}

            def run() -> tuple[torch.Tensor, torch.Tensor]:
                return topk_read.topk_visible_triton(q, keys, ids, seen, keys.shape[1], k, block_l=block_l,
                                                     block_m=block_m)  # (1, L, K) twice

            try:
                row.update(_same_selection(run(), base), ms=1000 * median(time_cuda(run, 1, 3)))
            except Exception as err:  # a tile too large for the device's registers or shared memory
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            print(json.dumps({"part": "read_tile", **row}), flush=True)
            rows.append(row)
    return rows


def _read_results(out: Path) -> dict[str, Any]:
    """The results file as it is now (empty when there is none); a file that is not one is
    refused, never replaced."""
    if not out.exists():
        return {}
    existing_file(out, "--out")
    try:
        results = json.loads(out.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HorizonError(f"--out {out} is not a memory results file (not valid JSON: {err}); "
                           "give another --out") from err
    if not isinstance(results, dict):
        raise HorizonError(f"--out {out} is not a memory results file (not a JSON object); give another --out")
    return results


def _check_free(out: Path, section: str, overwrite: bool, meanwhile: bool = False) -> dict[str, Any]:
    """The results file, after refusing to replace its ``section`` without ``overwrite``: called
    before any measurement (fail fast), and again just before the write (another call may have
    written it meanwhile)."""
    results = _read_results(out)
    if section in results and not overwrite:
        when = " (written by another call while this one measured)" if meanwhile else ""
        raise HorizonError(f"{out} already holds bench memory's {section!r} results{when}; pass --overwrite to "
                           "replace them (the other sections are kept), or --out for another file")
    return results


def _save(out: Path, section: str, value: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Add ``section`` to the results file as it is now, so sections written meanwhile are kept;
    atomic, so an interrupted write leaves the previous file."""
    results = _check_free(out, section, overwrite, meanwhile=True)
    results[section] = value
    atomic_write_json(out, results)
    return results


def run_memory_bench(cfg: MemoryBenchConfig) -> dict[str, Any]:
    """One part of the bench into its section of ``cfg.out`` ("cpu", "gpu" or "read"); a section
    the file already holds is refused before anything is measured, unless ``cfg.overwrite``."""
    if cfg.read and cfg.gpu:
        raise HorizonError("--read and --gpu are separate parts of bench memory; run them one at a time")
    out = Path(cfg.out)
    section = "read" if cfg.read else ("gpu" if cfg.gpu else "cpu")
    _check_free(out, section, cfg.overwrite)
    env = environment()
    if cfg.read:
        return _save(out, section, {"environment": env, "config": asdict(cfg), **bench_read(cfg)}, cfg.overwrite)
    rows = bench_gpu(cfg) if cfg.gpu else bench_cpu(cfg)
    results = _save(out, section, {"environment": env, "config": asdict(cfg), "rows": rows}, cfg.overwrite)
    if "cpu" in results:
        plot_memory(results, out.with_suffix(".png"))
    return results


def plot_memory(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["cpu"]["rows"] if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for backend in sorted({r["backend"] for r in rows}):
        pts = sorted((r["entries"], r) for r in rows if r["backend"] == backend)
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1]["ms_per_query_batched"] for p in pts], "o-", label=backend)
        axes[1].plot(xs, [p[1]["recall_at_k"] for p in pts], "o-", label=backend)
        axes[2].plot(xs, [p[1]["bytes_per_entry"] for p in pts], "o-", label=backend)
    for ax, title in zip(axes, ("ms per query (batch of 1024), CPU", "recall@8 vs exact", "bytes per entry")):
        ax.set_xscale("log")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    env = results["cpu"]["environment"]
    fig.suptitle(f"memory stores on {env.get('cpu_count')} CPU cores, key width {results['cpu']['config']['dim']}")
    fig.tight_layout()
    save_figure(fig, path)
