"""Exact top-K memory read, searched in blocks of queries so the score matrix stays bounded.

Visibility follows the stream: a token that has seen ``n`` completed chunks may read entries of
chunks ``n - capacity <= id < n``, exactly what a FIFO memory of ``capacity`` entries would hold
if the stream were fed one token at a time. This is what makes a long call equal to many short
ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from horizonlm.devices import autocast_dtype
from horizonlm.ops.topk_read import QUERY_TILE, topk_read, topk_visible_dense, visible_counts, visible_mask

__all__ = ["memory_read", "memory_topk_ids", "read_weights", "visible_mask"]


def _top_visible(q: Tensor, keys: Tensor, entry_ids: Tensor, seen: Tensor, capacity: int,
                 k: int, reference: bool = False, selection_keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The K best visible entries of a block of queries: scores (-inf where fewer than K are
    visible), differentiable in q and keys, and indices into ``keys``; equal scores rank newest
    first (entries are kept in stream order). One selection serves the read and the diagnostics.

    ``ops.topk_read`` chooses without the (L, M) score matrix: the fused Triton kernel on a CUDA
    device (checked against the dense selection on an H200 by ``horizon bench memory --read``:
    bench/results/memory_read.json), its blocked torch twin elsewhere; the dense selection
    (``topk_visible_dense``, chosen by ``reference``) is the reference the tests and the GPU check
    hold both to. ``selection_keys``: see :func:`topk_read` (the fast selection only)."""
    if reference:
        return topk_visible_dense(q, keys, entry_ids, seen, capacity, k)  # (B, Lb, K) twice
    return topk_read(q, keys, entry_ids, seen, capacity, k, selection_keys)  # (B, Lb, K) twice


def _selection_keys(keys: Tensor, queries: int) -> Tensor | None:
    """The keys the fast selection scores against under autocast: cast once to autocast's dtype
    when ``queries`` (per sequence) span more than one of the kernel's query tiles, each of
    which reads every key; None otherwise (outside autocast, or a decode step, where one pass
    over the keys as they are costs less than the cast), and the keys are scored as they are."""
    low = autocast_dtype(keys.device)
    if low is None or queries <= QUERY_TILE:
        return None
    return keys.detach().to(low)  # (B, M, Dk)


def count_tau(tau: float, growth: Tensor | None, counts: Tensor | None) -> float | Tensor:
    """The read's inverse temperature for each token: ``tau_t = tau * (1 + a * log n_t)`` with
    ``n_t`` the entries token t sees (at least 1) and a learned ``a`` (``growth``; None: ``tau``).

    Among more entries the best near-matches of a query come closer to an exact match, so a fixed
    tau blurs a read more the more it may see; growing tau with log n keeps it as sharp (the
    argument of Scalable-Softmax, Nakanishi 2025, made here for a top-K read). counts: (L,) or
    (B, L). Returns tau or counts' shape with a trailing 1, to scale (..., L, K) scores."""
    if growth is None:
        return tau
    return (tau * (1 + growth * torch.log(counts.clamp(min=1).to(growth.dtype)))).unsqueeze(-1)  # (L, 1) or (B, L, 1)


def read_weights(top_scores: Tensor, tau: float | Tensor, null_score: Tensor | None = None) -> Tensor:
    """Softmax weights of the K best scores (-inf where fewer than K are visible, weight 0 there).

    With ``null_score`` s_0 a null entry of value zero joins the softmax with logit ``tau * s_0``:
    ``w_j = exp(tau s_j) / (exp(tau s_0) + sum_i exp(tau s_i))``, so a read whose best matches
    score below s_0 fades towards zero instead of averaging whatever was nearest, and a token
    with nothing visible reads exactly what an unmatched token reads in training (zero).
    top_scores: (..., K); tau a number or a tensor broadcast against them (:func:`count_tau`).
    Returns (..., K)."""
    valid = torch.isfinite(top_scores)  # (..., K)
    # -inf slots are zeroed before the scale and masked after: no inf reaches a product, so a learned
    # (tensor) tau gets a finite gradient too.
    logits = (tau * top_scores.masked_fill(~valid, 0.0)).masked_fill(~valid, -1e4)  # (..., K)
    if null_score is None:
        return torch.softmax(logits, dim=-1) * valid  # (..., K); all zero where nothing is visible
    null = (tau * null_score).to(logits.dtype).expand(*logits.shape[:-1], 1)  # (..., 1)
    return torch.softmax(torch.cat([logits, null], dim=-1), dim=-1)[..., :-1] * valid  # (..., K)


def memory_read(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    entry_ids: Tensor,
    completed_before: Tensor,
    capacity: int,
    top_k: int,
    tau: float,
    block: int = 1024,
    null_score: Tensor | None = None,
    reference: bool = False,
    tau_growth: Tensor | None = None,
    live_from: Tensor | None = None,
) -> Tensor:
    """``r_t = sum_{j in topK} softmax(tau * q_t . k_j) v_j`` over the visible entries, with the
    null entry of :func:`read_weights` in the softmax when ``null_score`` is given.

    queries: (B, L, Dk), keys: (B, M, Dk), values: (B, M, Dv), entry_ids: (M,),
    completed_before: (L,), null_score: (1,) or None. A token with no visible entry reads zeros.
    ``tau_growth`` (1,) grows tau with the entries each token sees (:func:`count_tau`);
    ``live_from`` (B,) (``MemoryState.live_from``) leaves out of that count the entries a stream
    restarted cold still holds, zeroed, so it reads as a fresh stream does.
    ``reference`` selects with the dense score matrix instead of ``ops.topk_read`` (the check of
    the fast selection). Under autocast the fast selection of a long call scores in autocast's
    dtype (the keys cast once per call): in bfloat16 the H200 kernel takes a third of its float32 time
    (bench/results/memory_read.json), which is what a long training memory costs; the chosen
    scores, the weights and the gradients stay in the queries' dtype. Returns (B, L, Dv).
    """
    batch, length, _ = queries.shape
    n_entries = keys.shape[1]
    if n_entries == 0:
        return queries.new_zeros(batch, length, values.shape[-1])  # (B, L, Dv)
    k = min(top_k, n_entries)
    selection_keys = None if reference else _selection_keys(keys, length)  # (B, M, Dk) or None
    batch_index = torch.arange(batch, device=queries.device).view(batch, 1, 1)  # (B, 1, 1)
    counts = None if tau_growth is None else visible_counts(entry_ids, completed_before, capacity, live_from)
    taus = count_tau(tau, tau_growth, counts)  # tau or (L, 1) or (B, L, 1)
    reads = []
    for start in range(0, length, block):
        q = queries[:, start : start + block]  # (B, Lb, Dk)
        top_scores, top_index = _top_visible(q, keys, entry_ids, completed_before[start : start + block], capacity, k,
                                             reference, selection_keys)  # (B, Lb, K) twice
        tau_block = taus if tau_growth is None else taus[..., start : start + block, :]  # number, (Lb, 1) or (B, Lb, 1)
        weights = read_weights(top_scores, tau_block, null_score)  # (B, Lb, K)
        picked = values[batch_index, top_index]  # (B, Lb, K, Dv)
        reads.append(torch.einsum("blk,blkd->bld", weights, picked))  # (B, Lb, Dv)
    return torch.cat(reads, dim=1)  # (B, L, Dv)


@torch.no_grad()
def memory_topk_ids(
    queries: Tensor,
    keys: Tensor,
    entry_ids: Tensor,
    completed_before: Tensor,
    capacity: int,
    top_k: int,
    block: int = 1024,
    labels: Tensor | None = None,
) -> Tensor:
    """Stream-wide chunk ids of the entries :func:`memory_read` reads for each token, -1 where
    fewer than K are visible: which chunks a read found, for diagnostics (``bench recall``'s
    retrieval hit rate). Same arguments as :func:`memory_read`; ``labels`` (M,), if given, is
    reported instead of each entry's chunk id (e.g. the stream position of its token). Returns
    (B, L, K) int64. Selects as :func:`memory_read` does (under autocast, in its dtype)."""
    batch, length, _ = queries.shape
    k = min(top_k, keys.shape[1])
    if k == 0:
        return torch.full((batch, length, top_k), -1, dtype=torch.long, device=queries.device)  # (B, L, K)
    selection_keys = _selection_keys(keys, length)  # (B, M, Dk) or None
    picked = []
    for start in range(0, length, block):
        q = queries[:, start : start + block]  # (B, Lb, Dk)
        top_scores, top_index = _top_visible(q, keys, entry_ids, completed_before[start : start + block], capacity, k,
                                             selection_keys=selection_keys)
        ids = (entry_ids if labels is None else labels)[top_index]  # (B, Lb, K)
        picked.append(ids.masked_fill(~torch.isfinite(top_scores), -1))  # (B, Lb, K)
    return torch.cat(picked, dim=1)  # (B, L, K)
