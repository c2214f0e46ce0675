"""How much could a book's far past tell the model: a cache of its n-grams, measured.

Issue 23 asks that carrying the state through a book be worth 0.10 bits/byte over restarting it
every window. This probe measures what the far past offers in one plain, model-free form (the
book's own n-gram statistics beyond the window), and how much of it a trained model already takes:

- For every predicted byte ``j`` of a book and every context length ``k`` in ``LENGTHS``: among the
  earlier positions ``q`` whose ``k`` bytes before them equal the ``k`` bytes before ``j`` and that
  lie before ``j``'s window (where a model restarted every ``window`` bytes cannot see them) and
  no more than ``reach`` bytes back, ``total`` counts them and ``same`` those followed by byte
  ``x[j]``. The *far cache* uses the longest ``k`` with ``total > 0``: ``p_cache = same / total``.
  ``near`` says whether that context also occurs wholly inside the window.
- With a checkpoint's per-byte losses restarted every window (``reset``) and carried through the
  book (``carried``): how carried minus reset splits between bytes with a far context and the
  rest; the *cache mixture* ``(1 - lam) p_model + lam p_cache``, ``lam`` fitted per bucket
  (context length, count, near) on the other books (leave one book out), and what it gains; and
  the *oracle switch*, each byte scored by the better of the model and the cache (a bound on
  any per-byte choice between the two, not a model).

No training; the losses of each checkpoint are computed once and kept in ``--cache``.

    PYTHONPATH=src python bench/scripts/long_range_headroom.py --data runs/data/novels \\
        --checkpoints runs/cpu_s19_rate025_seed0 runs/cpu_s22_nomem_seed0 --windows 1024,8192 \\
        --cache runs/headroom --out bench/results/long_range_headroom_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

from horizonlm.bench.quality import _book_losses
from horizonlm.checkpoint import load_checkpoint
from horizonlm.data.stream import load_meta, open_split
from horizonlm.fileio import atomic_write_json, refuse_existing

LENGTHS = (8, 12, 16, 24, 32, 48, 64)
"""Context lengths tried, in bytes (the default induction key spans 16)."""

POSITION_BINS = (0, 8192, 65536, 524288, 1 << 40)
"""Byte positions in a book where the cache's gain is also reported: later bytes have more past."""

COUNT_BUCKETS = 5
"""A context seen 1, 2-3, 4-7, 8-15 or 16+ times: its own mixture weight."""

BASE = np.uint64(0x9E3779B97F4A7C15)
"""Odd multiplier of the polynomial hash (arithmetic mod 2**64)."""


def kgram_hashes(x: np.ndarray, k: int) -> np.ndarray:
    """h[j] = hash of ``x[j-k:j]`` for j >= k (0 before), built by doubling. (N + 1,)"""
    n = len(x)
    np.seterr(over="ignore")  # the hash wraps around mod 2**64 by design
    h = np.zeros(n + 1, dtype=np.uint64)  # (N + 1,)
    h[1:] = x.astype(np.uint64) + np.uint64(1)
    built, power, parts = 1, BASE, {}
    while built <= k:
        parts[built] = (h.copy(), power)
        nxt = np.zeros_like(h)  # (N + 1,)
        nxt[built:] = h[:-built] * power + h[built:]
        h, power, built = nxt, power * power, built * 2
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


def far_cache(x: np.ndarray, configs: list[tuple[int, int | None]]) -> dict[tuple, dict[str, np.ndarray]]:
    """For each (window, reach) in ``configs`` and every predicted byte 1..N-1: the longest context
    length with a far occurrence (``k``, 0 if none), its far occurrences (``total``), those followed
    by the byte (``same``), and whether that context also occurs wholly inside the window (``near``)."""
    n = len(x)
    j = np.arange(n)  # (N,): predicted positions (0 unused)
    out = {c: {"k": np.zeros(n, np.int64), "total": np.zeros(n, np.int64), "same": np.zeros(n, np.int64),
               "near": np.zeros(n, bool)} for c in configs}
    for k in LENGTHS:
        h = kgram_hashes(x, k)[:n]  # (N,): h[q] names x[q-k:q]
        valid = j >= k  # (N,)
        _, rank = np.unique(h, return_inverse=True)  # (N,)
        ctx = rank.astype(np.int64) * (n + 1)  # (N,): a context's block of keys
        both = (rank.astype(np.int64) * 256 + x) * (n + 1)  # (N,): a (context, next byte) pair's block
        by_ctx = np.sort((ctx + j)[valid])  # (M,)
        by_both = np.sort((both + j)[valid])  # (M,)
        latest = np.searchsorted(by_ctx, ctx + j) - 1  # (N,): the latest occurrence before j
        seen = valid & (latest >= 0) & (by_ctx[np.maximum(latest, 0)] // (n + 1) == rank)
        prev = np.where(seen, by_ctx[np.maximum(latest, 0)] % (n + 1), -1)  # (N,)
        for window, reach in configs:
            start = (np.maximum(j - 1, 0) // window) * window  # (N,): the window's first context byte
            lo = np.maximum(j - reach, 0) if reach else np.zeros(n, np.int64)  # (N,)
            lo = np.minimum(lo, start)
            total = np.searchsorted(by_ctx, ctx + start) - np.searchsorted(by_ctx, ctx + lo)  # (N,)
            same = np.searchsorted(by_both, both + start) - np.searchsorted(by_both, both + lo)  # (N,)
            hit = valid & (total > 0)
            o = out[(window, reach)]
            o["k"][hit], o["total"][hit], o["same"][hit] = k, total[hit], same[hit]
            o["near"][hit] = (prev[hit] >= 0) & (prev[hit] - k >= start[hit])
    return {c: {name: a[1:] for name, a in o.items()} for c, o in out.items()}


def check_far_cache(x: np.ndarray, window: int, reach: int | None, rng: np.random.Generator,
                    samples: int = 100) -> int:
    """Brute-force check of :func:`far_cache` at random positions; returns how many disagreed."""
    got = far_cache(x, [(window, reach)])[(window, reach)]
    bad = 0
    for j in rng.integers(1, len(x), samples):
        start = ((j - 1) // window) * window
        lo = min(max(j - reach, 0) if reach else 0, start)
        want = (0, 0, 0, False)
        for k in LENGTHS:
            if j < k:
                continue
            grams = np.lib.stride_tricks.sliding_window_view(x[:j], k)  # (j - k + 1, k): row q - k is x[q-k:q]
            hits = np.flatnonzero((grams[:-1] == x[j - k : j]).all(axis=1)) + k  # (H,): earlier q < j
            far = hits[(hits >= lo) & (hits < start)]  # (F,)
            if len(far):
                want = (k, len(far), int((x[far] == x[j]).sum()), bool(len(hits) and hits[-1] - k >= start))
        bad += want != (got["k"][j - 1], got["total"][j - 1], got["same"][j - 1], bool(got["near"][j - 1]))
    return bad


def book_losses(checkpoint: str, data: str, window: int, reset: int | None, cache: Path) -> list[np.ndarray]:
    """Per-book per-byte losses (nats), fed ``window`` bytes a call, the state carried through the
    book (``reset`` None) or restarted every ``reset`` bytes; computed once into ``cache``."""
    file = cache / f"{Path(checkpoint).name}_w{window}_{'carried' if reset is None else f'reset{reset}'}.npz"
    if file.is_file():
        saved = np.load(file)
        return [saved[f"book{b}"] for b in range(len(saved.files))]
    model = load_checkpoint(checkpoint).model
    test = open_split(data, "test")
    documents = load_meta(data)["documents"]["test"]
    out = _book_losses(model, test, documents, window, "cpu", reset, 16)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / (file.stem + ".tmp.npz")
    np.savez(tmp, **{f"book{b}": arr for b, arr in enumerate(out)})
    tmp.replace(file)
    return out


def fit_lambda(loss: np.ndarray, p_cache: np.ndarray) -> float:
    """The weight on the cache that minimises the mean loss (nats) of these bytes."""
    p = np.exp(-loss.astype(np.float64))  # (M,)
    grid = np.concatenate([np.linspace(0, 0.9, 91), 1 - np.geomspace(0.1, 1e-3, 30)])  # (G,)
    cost = [-np.log((1 - lam) * p + lam * p_cache + 1e-300).mean() for lam in grid]
    return float(grid[int(np.argmin(cost))])


def bits(nats: float, count: int) -> float:
    """A sum of losses in nats over ``count`` bytes, as bits per byte."""
    return nats / count / math.log(2)


def bucket(f: dict[str, np.ndarray]) -> np.ndarray:
    """Each byte's mixture bucket: context length, count, near; -1 without a far context. (N-1,)"""
    length = np.searchsorted(LENGTHS, f["k"])  # (N-1,)
    count = np.minimum(np.log2(np.maximum(f["total"], 1)).astype(np.int64), COUNT_BUCKETS - 1)  # (N-1,)
    return np.where(f["k"] > 0, (length * COUNT_BUCKETS + count) * 2 + f["near"], -1)


def by_position(before: list[np.ndarray], after: list[np.ndarray]) -> list[dict]:
    """Mean loss removed (bits/byte) in each of POSITION_BINS, over the books' bytes there."""
    rows = []
    for lo, hi in zip(POSITION_BINS[:-1], POSITION_BINS[1:]):
        cut = [(b[lo:hi].astype(np.float64), a[lo:hi]) for b, a in zip(before, after)]
        count = sum(len(b) for b, _ in cut)
        if count:
            rows.append({"from": lo, "to": min(hi, max(len(b) for b in before)), "bytes": count,
                         "gain": bits(sum(float((b - a).sum()) for b, a in cut), count)})
    return rows


def analyse(feats: list[dict[str, np.ndarray]], losses: dict[str, list[np.ndarray]] | None = None) -> dict:
    """What the far cache covers; with losses, where carried minus reset is earned and what the
    cache adds to each mode (see the module docstring)."""
    total = sum(len(f["k"]) for f in feats)
    has = [f["k"] > 0 for f in feats]  # per book (N-1,)
    p_cache = [f["same"] / np.maximum(f["total"], 1) for f in feats]  # per book (N-1,)
    rows = []
    for k in LENGTHS:
        sel = [f["k"] == k for f in feats]
        count = int(sum(m.sum() for m in sel))
        row = {"context_length": k, "share_of_bytes": count / total,
               "mean_p_cache": float(sum(p[m].sum() for p, m in zip(p_cache, sel)) / max(count, 1))}
        if losses is not None and count:
            for mode in losses:
                row[f"{mode}_bits_per_byte"] = bits(sum(float(l[m].sum()) for l, m in zip(losses[mode], sel)), count)
        rows.append(row)
    result = {"far_context_share": float(sum(h.sum() for h in has) / total), "by_context_length": rows}
    if losses is None:
        return result
    gain = [r - c for r, c in zip(losses["reset"], losses["carried"])]  # per book (N-1,)
    long = [f["k"] >= 16 for f in feats]
    result["carried_minus_reset"] = {
        "all": bits(sum(float(g.sum()) for g in gain), total),
        "share_from_bytes_with_far_context": float(sum(float(g[h].sum()) for g, h in zip(gain, has))
                                                   / max(1e-12, sum(float(g.sum()) for g in gain))),
        "share_from_far_contexts_of_16_or_more": float(sum(float(g[m].sum()) for g, m in zip(gain, long))
                                                       / max(1e-12, sum(float(g.sum()) for g in gain)))}
    buckets = [bucket(f) for f in feats]
    for mode in losses:
        whole = bits(sum(float(l.sum()) for l in losses[mode]), total)
        mixed, weights, mixed_loss = 0.0, [], []
        for held in range(len(feats)):  # each book's weights fitted on the others
            lam = np.zeros(len(feats[held]["k"]))  # (N-1,)
            fitted = {}
            for b in np.unique(buckets[held][buckets[held] >= 0]):
                others = [i for i in range(len(feats)) if i != held]
                loss_b = np.concatenate([losses[mode][i][buckets[i] == b] for i in others])  # (M,)
                if len(loss_b) < 100:
                    continue
                fitted[int(b)] = fit_lambda(loss_b, np.concatenate([p_cache[i][buckets[i] == b] for i in others]))
                lam[buckets[held] == b] = fitted[int(b)]
            weights.append(fitted)
            p = np.exp(-losses[mode][held].astype(np.float64))  # (N-1,)
            mixed_loss.append(-np.log((1 - lam) * p + lam * p_cache[held] + 1e-300))  # (N-1,)
            mixed += float(mixed_loss[-1].sum())
        switched = sum(float(np.minimum(l, np.where(pc > 0, -np.log(np.maximum(pc, 1e-300)), np.inf)).sum())
                       for l, pc in zip(losses[mode], p_cache))
        result[mode] = {"bits_per_byte": whole,
                        "cache_mixture_gain": whole - bits(mixed, total),
                        "oracle_switch_gain": whole - bits(switched, total),
                        "mean_weight_on_cache": float(np.mean([v for w in weights for v in w.values()] or [0.0])),
                        "cache_mixture_gain_by_position": by_position(losses[mode], mixed_loss)}
    return result


def plot(result: dict, path: Path) -> None:
    """One panel a reset window: what carrying the state earns, and what the far cache adds on top
    of the carried model, against how far back the cache may look."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = list(result["windows"])
    fig, axes = plt.subplots(1, len(windows), figsize=(5.5 * len(windows), 4), squeeze=False)
    for ax, w in zip(axes[0], windows):
        for i, (ckpt, by_reach) in enumerate(result["windows"][w]["checkpoints"].items()):
            reaches = list(by_reach)
            xs = range(len(reaches))
            color = f"C{i}"
            ax.plot(xs, [by_reach[r]["carried"]["cache_mixture_gain"] for r in reaches], "o-", color=color,
                    label=f"{Path(ckpt).name}: cache on top of carried")
            ax.axhline(by_reach[reaches[0]]["carried_minus_reset"]["all"], color=color, ls="--",
                       label=f"{Path(ckpt).name}: carried minus reset")
            ax.set_xticks(list(xs), [r if r == "book" else f"{int(r) // 1024}K" for r in reaches])
        ax.set_title(f"reset every {w} bytes")
        ax.set_xlabel("how far back the cache looks (bytes)")
        ax.set_ylabel("bits/byte")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("novels test: a far n-gram cache mixed into CPU checkpoints", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a prepared corpus folder (its test split is read)")
    parser.add_argument("--checkpoints", nargs="*", default=[], help="checkpoints whose losses to split")
    parser.add_argument("--eval-window", type=int, default=1024, help="bytes fed to a checkpoint a call")
    parser.add_argument("--windows", default="1024,8192",
                        help="reset windows: the cache statistics and the checkpoints' reset scores for each")
    parser.add_argument("--reaches", default="4096,16384,65536,524288,book",
                        help="how far back the cache may look, in bytes ('book': anywhere before the window)")
    parser.add_argument("--cache", default="runs/headroom", help="folder for the checkpoints' per-byte losses")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    refuse_existing(args.out, args.overwrite)
    refuse_existing(str(Path(args.out).with_suffix(".png")), args.overwrite)
    torch.set_num_threads(args.threads)
    test = np.asarray(open_split(args.data, "test"))
    documents = load_meta(args.data)["documents"]["test"]
    texts = [test[start:end] for _, start, end in documents]
    windows = [int(v) for v in args.windows.split(",")]
    reaches = [None if v == "book" else int(v) for v in args.reaches.split(",")]
    configs = [(w, r) for w in windows for r in reaches if r is None or r > w]
    rng = np.random.default_rng(0)
    check = {"positions": 200, "bytes": 30000,
             "disagreed": sum(check_far_cache(texts[3][:30000], w, r, rng) for w, r in [(1024, 4096), (1024, None)])}
    print("brute-force check of the far cache:", check, flush=True)
    feats = [far_cache(t, configs) for t in texts]  # per book {config: features}
    result = {"probe": __doc__.split("\n\n")[0], "lengths": list(LENGTHS), "books": [d[0] for d in documents],
              "brute_force_check": check, "windows": {}}
    for w in windows:
        entry = {"cache_alone": {}, "checkpoints": {}}
        for r in (r for r in reaches if r is None or r > w):
            entry["cache_alone"][str(r or "book")] = analyse([f[(w, r)] for f in feats])
        for ckpt in args.checkpoints:
            losses = {"carried": book_losses(ckpt, args.data, args.eval_window, None, Path(args.cache)),
                      "reset": book_losses(ckpt, args.data, args.eval_window, w, Path(args.cache))}
            entry["checkpoints"][ckpt] = {str(r or "book"): analyse([f[(w, r)] for f in feats], losses)
                                          for r in reaches if r is None or r > w}
            print(w, ckpt, {r: (round(v["carried_minus_reset"]["all"], 4), round(v["reset"]["cache_mixture_gain"], 4),
                                round(v["carried"]["cache_mixture_gain"], 4))
                            for r, v in entry["checkpoints"][ckpt].items()}, flush=True)
        result["windows"][str(w)] = entry
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result["environment"] = {"machine": "this project's 2-core CPU machine", "python": platform.python_version(),
                             "torch": torch.__version__, "commit": commit,
                             "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}
    result["command"] = "PYTHONPATH=src python bench/scripts/long_range_headroom.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
        if v not in (False, None, []) and k != "overwrite")
    atomic_write_json(args.out, result)
    plot(result, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
