"""``horizon bench headroom``: what a book's far past offers, as exact counts, and how much of it
a trained model already takes.

Issue 23 asks that carrying the state through a book be worth 0.10 bits/byte over restarting it
every window. This bench measures what the far past offers in one plain, model-free form, the
book's own n-gram statistics beyond the window:

- For every predicted byte ``j`` of a test book and every context length ``k`` (``--lengths``, :data:`LENGTHS` unless told):
  among the earlier positions ``q`` whose ``k`` bytes before them equal the ``k`` bytes before
  ``j``, that lie before ``j``'s window (a model restarted every ``window`` bytes cannot see them)
  and no more than ``reach`` bytes back, ``total`` counts them and ``same`` those followed by byte
  ``x[j]``. The *far cache* takes the longest ``k`` with ``total > 0``: ``p_cache = same / total``;
  ``near`` says whether that context also stands wholly inside the window.
- Given checkpoints, their per-byte losses with the state carried through each book and restarted
  every window; how carried minus reset splits between bytes with a far context and the rest; the
  *cache mixture* ``(1 - lam) p_model + lam p_cache`` with ``lam`` fitted per bucket (context
  length, count, near) on the other books and scored on the held-out one; and the *oracle switch*,
  each byte scored by the better of model and cache (it peeks at the answer: a bound, not a model).

No training. A slow, obviously-correct twin of the counts (:func:`far_cache_reference`) checks the
fast one on the data itself, and the check is written into the results.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from horizonlm.bench.common import environment
from horizonlm.bench.quality import _book_losses
from horizonlm.checkpoint import checkpoint_info, load_checkpoint
from horizonlm.data.stream import load_meta, open_split
from horizonlm.devices import resolve_device
from horizonlm.errors import HorizonError
from horizonlm.fileio import atomic_write, atomic_write_json, refuse_existing

LENGTHS = (8, 12, 16, 24, 32, 48, 64)
"""Context lengths tried, in bytes (the default induction key spans 16)."""

COUNT_BUCKETS = 5
"""A context seen 1, 2-3, 4-7, 8-15 or 16+ times far back gets its own mixture weight."""

POSITION_BINS = (0, 8192, 65536, 524288, 1 << 40)
"""Byte positions in a book where the cache's gain is also reported: later bytes have more past."""

MIN_FIT = 100
"""Bytes a bucket needs in the other books for a weight to be fitted (else the cache is not used)."""

_BASE = np.uint64(0x9E3779B97F4A7C15)
"""Odd multiplier of the polynomial hash (arithmetic mod 2**64)."""


@dataclass
class HeadroomConfig:
    """Settings of ``horizon bench headroom``."""

    out: str = "bench/results/long_range_headroom.json"
    """Results file (refused if it or its PNG exists, unless --overwrite)."""
    overwrite: bool = False
    """Replace an existing results file."""
    data: str = "runs/data/novels"
    """A prepared byte-level corpus; its test split's books are read."""
    checkpoints: str = ""
    """Comma-separated checkpoints whose per-byte losses the cache is mixed into (none: counts alone)."""
    windows: str = "1024,8192"
    """Comma-separated reset windows in bytes: the cache looks before each byte's window."""
    reaches: str = "4096,16384,65536,524288,book"
    """How far back the cache may look, in bytes (``book``: anywhere before the window); only
    reaches longer than a window are used with it."""
    eval_window: int = 1024
    """Bytes fed to a checkpoint per call (the state carried between calls)."""
    max_bytes: int = 0
    """Read at most this many bytes of each book (0: whole books)."""
    batch: int = 16
    """Streams per call when scoring checkpoints."""
    loss_cache: str = ""
    """Folder keeping each checkpoint's per-byte losses for reuse ('' keeps none)."""
    check_positions: int = 200
    """Positions where the counts are checked against the slow reference."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    lengths: str = ",".join(map(str, LENGTHS))
    """Comma-separated context lengths in bytes, ascending: the cache takes the longest that occurred."""

    def __post_init__(self) -> None:
        for name in ("eval_window", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_bytes < 0 or self.check_positions < 0:
            raise ValueError("max_bytes and check_positions must be >= 0")
        if not self.window_list() or min(self.window_list()) < 1:
            raise ValueError(f"windows must be positive integers, got {self.windows!r}")
        if not self.reach_list() or any(r is not None and r < 1 for r in self.reach_list()):
            raise ValueError(f"reaches must be positive integers or 'book', got {self.reaches!r}")
        lengths = self.length_list()
        if not lengths or lengths[0] < 1 or list(lengths) != sorted(set(lengths)):
            raise ValueError(f"lengths must be ascending distinct positive integers, got {self.lengths!r}")

    def length_list(self) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in self.lengths.split(",") if v.strip())
        except ValueError as err:
            raise ValueError(f"lengths must be comma-separated integers, got {self.lengths!r}") from err

    def window_list(self) -> list[int]:
        try:
            return [int(v) for v in self.windows.split(",") if v.strip()]
        except ValueError as err:
            raise ValueError(f"windows must be comma-separated integers, got {self.windows!r}") from err

    def reach_list(self) -> list[int | None]:
        try:
            return [None if v.strip() == "book" else int(v) for v in self.reaches.split(",") if v.strip()]
        except ValueError as err:
            raise ValueError(f"reaches must be integers or 'book', got {self.reaches!r}") from err

    def checkpoint_list(self) -> list[str]:
        return [c.strip() for c in self.checkpoints.split(",") if c.strip()]


def kgram_hashes(x: np.ndarray, k: int) -> np.ndarray:
    """h[j] = hash of ``x[j-k:j]`` for j >= k (0 before), built by doubling. (N + 1,)"""
    with np.errstate(over="ignore"):  # the hash wraps around mod 2**64 by design
        h = np.zeros(len(x) + 1, dtype=np.uint64)  # (N + 1,)
        h[1:] = x.astype(np.uint64) + np.uint64(1)
        built, power, parts = 1, _BASE, {}
        while built <= k:
            parts[built] = (h.copy(), power)
            longer = np.zeros_like(h)  # (N + 1,)
            longer[built:] = h[:-built] * power + h[built:]
            h, power, built = longer, power * power, built * 2
        out, out_len = None, 0
        for size in sorted(parts, reverse=True):  # k as a sum of powers of two
            if k - out_len >= size:
                part, part_power = parts[size]
                if out is None:
                    out = part.copy()  # (N + 1,)
                else:
                    shifted = np.zeros_like(out)  # (N + 1,)
                    shifted[size:] = out[:-size]
                    out = shifted * part_power + part  # the older bytes times B**size, then the newer
                out_len += size
    out[:k] = 0
    return out


def _window_start(j: np.ndarray, window: int) -> np.ndarray:
    """The first byte a model restarted every ``window`` bytes sees when predicting byte j."""
    return (np.maximum(j - 1, 0) // window) * window


def far_cache(x: np.ndarray, configs: list[tuple[int, int | None]], lengths: tuple[int, ...] = LENGTHS
              ) -> dict[tuple, dict[str, np.ndarray]]:
    """For each (window, reach) and every predicted byte 1..N-1: the longest context length with a
    far occurrence (``k``, 0 if none), its far occurrences (``total``), those followed by the byte
    (``same``), and whether that context also stands wholly inside the window (``near``)."""
    n = len(x)
    if n * 256 * (n + 1) >= 1 << 63:
        raise HorizonError(f"a book of {n} bytes is too long for the far cache's int64 keys; set max_bytes")
    j = np.arange(n)  # (N,): predicted positions (0 unused)
    out = {c: {"k": np.zeros(n, np.int64), "total": np.zeros(n, np.int64), "same": np.zeros(n, np.int64),
               "near": np.zeros(n, bool)} for c in configs}
    for k in lengths:
        valid = j >= k  # (N,)
        _, rank = np.unique(kgram_hashes(x, k)[:n], return_inverse=True)  # (N,): rank[q] names x[q-k:q]
        rank = rank.astype(np.int64)
        ctx = rank * (n + 1)  # (N,): the first key of a context's block
        both = (rank * 256 + x) * (n + 1)  # (N,): the first key of a (context, next byte) block
        by_ctx = np.sort((ctx + j)[valid])  # (M,)
        by_both = np.sort((both + j)[valid])  # (M,)
        latest = np.searchsorted(by_ctx, ctx + j) - 1  # (N,): the latest occurrence before j
        seen = valid & (latest >= 0) & (by_ctx[np.maximum(latest, 0)] // (n + 1) == rank)  # (N,)
        prev = np.where(seen, by_ctx[np.maximum(latest, 0)] % (n + 1), -1)  # (N,)
        for window, reach in configs:
            start = _window_start(j, window)  # (N,)
            lo = np.minimum(np.maximum(j - reach, 0) if reach else np.zeros(n, np.int64), start)  # (N,)
            total = np.searchsorted(by_ctx, ctx + start) - np.searchsorted(by_ctx, ctx + lo)  # (N,)
            same = np.searchsorted(by_both, both + start) - np.searchsorted(by_both, both + lo)  # (N,)
            hit = valid & (total > 0)  # (N,)
            o = out[(window, reach)]
            o["k"][hit], o["total"][hit], o["same"][hit] = k, total[hit], same[hit]
            o["near"][hit] = (prev[hit] >= 0) & (prev[hit] - k >= start[hit])
    return {c: {name: a[1:] for name, a in o.items()} for c, o in out.items()}


def far_cache_reference(x: np.ndarray, j: int, window: int, reach: int | None, lengths: tuple[int, ...] = LENGTHS
                        ) -> tuple[int, int, int, bool]:
    """:func:`far_cache` at one predicted byte j by direct search: (k, total, same, near)."""
    start = ((j - 1) // window) * window
    lo = min(max(j - reach, 0) if reach else 0, start)
    found = (0, 0, 0, False)
    for k in lengths:
        if j < k:
            continue
        grams = np.lib.stride_tricks.sliding_window_view(x[:j], k)  # (j - k + 1, k): row q - k is x[q-k:q]
        hits = np.flatnonzero((grams[:-1] == x[j - k : j]).all(axis=1)) + k  # (H,): every earlier q
        far = hits[(hits >= lo) & (hits < start)]  # (F,)
        if len(far):
            found = (k, len(far), int((x[far] == x[j]).sum()), bool(hits[-1] - k >= start))
    return found


def check_far_cache(x: np.ndarray, window: int, reach: int | None, positions: int, seed: int = 0,
                    lengths: tuple[int, ...] = LENGTHS) -> int:
    """How many of ``positions`` random bytes :func:`far_cache` and its reference disagree on."""
    got = far_cache(x, [(window, reach)], lengths)[(window, reach)]
    rng = np.random.default_rng(seed)
    bad = 0
    for j in rng.integers(1, len(x), positions):
        fast = (int(got["k"][j - 1]), int(got["total"][j - 1]), int(got["same"][j - 1]), bool(got["near"][j - 1]))
        bad += fast != far_cache_reference(x, int(j), window, reach, lengths)
    return bad


def fit_weight(loss: np.ndarray, p_cache: np.ndarray) -> float:
    """The weight on the cache minimising the mean loss (nats) of these bytes, on a fixed grid."""
    p = np.exp(-loss.astype(np.float64))  # (M,)
    grid = np.concatenate([np.linspace(0, 0.9, 91), 1 - np.geomspace(0.1, 1e-3, 30)])  # (G,)
    cost = [-np.log((1 - lam) * p + lam * p_cache + 1e-300).mean() for lam in grid]
    return float(grid[int(np.argmin(cost))])


def bits(nats: float, count: int) -> float:
    """A sum of losses in nats over ``count`` bytes, as bits per byte."""
    return nats / count / math.log(2)


def bucket(f: dict[str, np.ndarray], lengths: tuple[int, ...] = LENGTHS) -> np.ndarray:
    """Each byte's mixture bucket: context length, count, near; -1 without a far context. (N-1,)"""
    length = np.searchsorted(lengths, f["k"])  # (N-1,)
    count = np.minimum(np.log2(np.maximum(f["total"], 1)).astype(np.int64), COUNT_BUCKETS - 1)  # (N-1,)
    return np.where(f["k"] > 0, (length * COUNT_BUCKETS + count) * 2 + f["near"], -1)


def by_position(before: list[np.ndarray], after: list[np.ndarray]) -> list[dict[str, Any]]:
    """Mean loss removed (bits/byte) in each of POSITION_BINS, over the books' bytes there."""
    rows = []
    for lo, hi in zip(POSITION_BINS[:-1], POSITION_BINS[1:]):
        cut = [(b[lo:hi].astype(np.float64), a[lo:hi]) for b, a in zip(before, after)]
        count = sum(len(b) for b, _ in cut)
        if count:
            rows.append({"from": lo, "to": min(hi, max(len(b) for b in before)), "bytes": count,
                         "gain": bits(sum(float((b - a).sum()) for b, a in cut), count)})
    return rows


def compare_by_position(losses: dict[str, list[np.ndarray]], first: dict[str, list[np.ndarray]] | None
                        ) -> dict[str, list[dict[str, Any]]]:
    """By position in the books: what carrying the state earns over resetting it, and what this
    checkpoint gains over the first one listed in each mode (``gain`` > 0: this one is better)."""
    out = {"carried_over_reset": by_position(losses["reset"], losses["carried"])}
    if first is not None:
        for mode in ("carried", "reset"):
            out[f"{mode}_over_first"] = by_position(first[mode], losses[mode])
    return out


def by_bucket(buckets: np.ndarray, *arrays: np.ndarray) -> dict[int, tuple[np.ndarray, ...]]:
    """One book's bytes grouped by mixture bucket (those without a far context left out), each
    group in the book's order: bucket -> the arrays' values there."""
    order = np.argsort(buckets, kind="stable")  # (N-1,)
    keys, starts = np.unique(buckets[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    return {int(b): tuple(a[order[lo:hi]] for a in arrays) for b, lo, hi in zip(keys, starts, ends) if b >= 0}


def mix_held_out(losses: list[np.ndarray], p_cache: list[np.ndarray], buckets: list[np.ndarray],
                 n_lengths: int = len(LENGTHS)) -> tuple[list[np.ndarray], list[dict]]:
    """Each book's per-byte loss (nats) with the cache mixed in at weights fitted on the other books,
    and those weights by bucket."""
    groups = [by_bucket(b, l, p) for b, l, p in zip(buckets, losses, p_cache)]  # per book
    mixed, weights = [], []
    for held in range(len(losses)):
        others = [groups[i] for i in range(len(losses)) if i != held]
        table = np.zeros(n_lengths * COUNT_BUCKETS * 2 + 1)  # (buckets + 1,): the last for "none"
        fitted = {}
        for b in groups[held]:
            parts = [g[b] for g in others if b in g]
            loss_b = np.concatenate([part[0] for part in parts]) if parts else np.zeros(0)  # (M,)
            if len(loss_b) >= MIN_FIT:
                fitted[b] = table[b] = fit_weight(loss_b, np.concatenate([part[1] for part in parts]))
        weights.append(fitted)
        lam = table[buckets[held]]  # (N-1,): bucket -1 reads the last entry, 0
        p = np.exp(-losses[held].astype(np.float64))  # (N-1,)
        mixed.append(-np.log((1 - lam) * p + lam * p_cache[held] + 1e-300))  # (N-1,)
    return mixed, weights


def analyse(feats: list[dict[str, np.ndarray]], losses: dict[str, list[np.ndarray]] | None = None,
            lengths: tuple[int, ...] = LENGTHS) -> dict[str, Any]:
    """What the far cache covers; with losses (``carried`` and ``reset``, per book), where carried
    minus reset is earned and what the cache adds to each."""
    total = sum(len(f["k"]) for f in feats)
    has = [f["k"] > 0 for f in feats]  # per book (N-1,)
    p_cache = [f["same"] / np.maximum(f["total"], 1) for f in feats]  # per book (N-1,)
    rows = []
    for k in lengths:
        sel = [f["k"] == k for f in feats]
        count = int(sum(m.sum() for m in sel))
        row = {"context_length": k, "share_of_bytes": count / total,
               "mean_p_cache": float(sum(p[m].sum() for p, m in zip(p_cache, sel)) / max(count, 1))}
        if losses is not None and count:
            for mode in losses:
                row[f"{mode}_bits_per_byte"] = bits(sum(float(l[m].sum()) for l, m in zip(losses[mode], sel)), count)
        rows.append(row)
    result: dict[str, Any] = {"far_context_share": float(sum(h.sum() for h in has) / total),
                              "by_context_length": rows}
    if losses is None:
        return result
    gain = [r.astype(np.float64) - c for r, c in zip(losses["reset"], losses["carried"])]  # per book (N-1,)
    whole_gain = sum(float(g.sum()) for g in gain)

    def share(part: float) -> float | None:  # of what carrying earns, where it earns anything
        return part / whole_gain if whole_gain > 0 else None

    result["carried_minus_reset"] = {
        "all": bits(whole_gain, total),
        "share_from_bytes_with_far_context": share(sum(float(g[h].sum()) for g, h in zip(gain, has))),
        "share_from_far_contexts_of_16_or_more": share(sum(float(g[f["k"] >= 16].sum()) for g, f in zip(gain, feats)))}
    buckets = [bucket(f, lengths) for f in feats]  # per book (N-1,)
    for mode in ("carried", "reset"):
        whole = bits(sum(float(l.sum()) for l in losses[mode]), total)
        mixed, weights = mix_held_out(losses[mode], p_cache, buckets, len(lengths))
        for k, row in zip(lengths, rows):  # each context length's part of the whole gain (bits over all bytes)
            row[f"{mode}_cache_gain_part"] = bits(sum(float((l[f["k"] == k] - m[f["k"] == k]).sum())
                                                      for l, m, f in zip(losses[mode], mixed, feats)), total)
        switched = sum(float(np.minimum(l, np.where(pc > 0, -np.log(np.maximum(pc, 1e-300)), np.inf)).sum())
                       for l, pc in zip(losses[mode], p_cache))
        result[mode] = {"bits_per_byte": whole,
                        "cache_mixture_gain": whole - bits(sum(float(m.sum()) for m in mixed), total),
                        "oracle_switch_gain": whole - bits(switched, total),
                        "mean_weight_on_cache": float(np.mean([v for w in weights for v in w.values()] or [0.0])),
                        "cache_mixture_gain_by_position": by_position(losses[mode], mixed)}
    return result


def book_losses(cfg: HeadroomConfig, checkpoint: str, books: list[list], reset: int | None) -> list[np.ndarray]:
    """Per-book per-byte losses (nats), the state carried through each book (``reset`` None) or
    restarted every ``reset`` bytes; kept in ``cfg.loss_cache`` under a name that hashes the
    checkpoint, the data and the settings, so a changed checkpoint is never read from it."""
    _, info = checkpoint_info(checkpoint)
    key = hashlib.sha256(json.dumps([info, load_meta(cfg.data)["splits"]["test"]["sha256"], books,
                                     cfg.eval_window, reset], sort_keys=True).encode()).hexdigest()[:16]
    file = Path(cfg.loss_cache) / f"{Path(checkpoint).name}_{key}.npz" if cfg.loss_cache else None
    if file is not None and file.is_file():
        saved = np.load(file)
        return [saved[f"book{b}"] for b in range(len(books))]
    device = resolve_device(cfg.device)
    model = load_checkpoint(checkpoint).model.to(device)
    losses = _book_losses(model, open_split(cfg.data, "test"), books, cfg.eval_window, device, reset, cfg.batch)
    if file is not None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **{f"book{b}": arr for b, arr in enumerate(losses)})

        atomic_write(file, write)
    return losses


def run_headroom(cfg: HeadroomConfig) -> dict[str, Any]:
    out = refuse_existing(cfg.out, cfg.overwrite)
    refuse_existing(out.with_suffix(".png"), cfg.overwrite)
    meta = load_meta(cfg.data)
    if meta.get("vocab_size", 256) > 256:
        raise HorizonError(f"{cfg.data} is not byte-level (vocabulary {meta['vocab_size']}): the far cache counts bytes")
    for ckpt in cfg.checkpoint_list():
        checkpoint_info(ckpt)  # a missing or damaged checkpoint is refused before any work
    test = open_split(cfg.data, "test")
    documents = meta.get("documents", {}).get("test") or [[None, 0, len(test)]]
    books = [[name, int(start), int(start) + min(int(end) - int(start), cfg.max_bytes or int(end) - int(start))]
             for name, start, end in documents]
    books = [b for b in books if b[2] - b[1] > 1]
    if len(books) < 2:
        raise HorizonError(f"{cfg.data}'s test split has {len(books)} book(s): the cache's weights are fitted "
                           "on the other books, so it needs at least two")
    texts = [np.asarray(test[start:end]) for _, start, end in books]
    windows, reaches, lengths = cfg.window_list(), cfg.reach_list(), cfg.length_list()
    configs = [(w, r) for w in windows for r in reaches if r is None or r > w]
    longest = max(range(len(texts)), key=lambda i: len(texts[i]))
    sample = texts[longest][:30000]
    check = {"positions": cfg.check_positions, "bytes": len(sample),
             "disagreed": check_far_cache(sample, windows[0], None, cfg.check_positions, lengths=lengths)}
    if check["disagreed"]:
        raise HorizonError(f"the far cache disagrees with its reference at {check['disagreed']} positions")
    feats = [far_cache(t, configs, lengths) for t in texts]  # per book {config: features}
    result: dict[str, Any] = {"environment": environment(), "config": asdict(cfg), "lengths": list(lengths),
                              "books": [b[0] for b in books], "bytes": sum(len(t) - 1 for t in texts),
                              "reference_check": check, "windows": {}}
    carried: dict[str, list[np.ndarray]] = {}
    for w in windows:
        used = [r for r in reaches if r is None or r > w]
        entry: dict[str, Any] = {"cache_alone": {str(r or "book"): analyse([f[(w, r)] for f in feats], lengths=lengths)
                                                 for r in used},
                                 "checkpoints": {}, "by_position": {}}
        first: dict[str, list[np.ndarray]] | None = None
        for ckpt in cfg.checkpoint_list():
            if ckpt not in carried:  # the same for every window: scored once
                carried[ckpt] = book_losses(cfg, ckpt, books, None)
            losses = {"carried": carried[ckpt], "reset": book_losses(cfg, ckpt, books, w)}
            entry["checkpoints"][ckpt] = {str(r or "book"): analyse([f[(w, r)] for f in feats], losses, lengths)
                                          for r in used}
            entry["by_position"][ckpt] = compare_by_position(losses, first)
            first = first or losses
        result["windows"][str(w)] = entry
    atomic_write_json(out, result)
    from horizonlm.bench.headroom_plot import plot_headroom

    plot_headroom(result, out.with_suffix(".png"))
    return result
