"""Exact maximum-inner-product search, blocked over the keys so no score matrix larger than
``queries x key_block`` is ever built; partial top-k lists are merged block by block."""

from __future__ import annotations

import torch
from torch import Tensor


NEAR_TIE_ULPS = 8
"""Scores within this many units of float32 roundoff times max(1, |k-th score|) of the k-th score
count as tied with it, whatever the scores' dtype: a float64 reference then makes the choices the
float32 model makes (with float64's own roundoff it took the higher of two scores 1e-6 apart where
float32 took the newer, and read another entry)."""


def topk_newest_first(scores: Tensor, k: int, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``scores.topk(k)`` along the last dim, except that scores tied with the k-th rank newest
    first (the larger ``positions``, by default the larger column index): which of several equal
    scores fills the last places is then a property of the entries, not of where they sit in the
    matrix, so a stream read in one call and in pieces picks the same entries (identical contexts
    make identical keys, so ties are common).

    Tied means within rounding (:data:`NEAR_TIE_ULPS`), not bit for bit: the same key's score can
    differ in its last bits between calls of different lengths (a matrix product of 7 rows need
    not round as one of 51 does; seen on an Intel CPU in float64, 1 ulp apart), and an exact rule
    would then let that noise choose. The entries scoring above the k-th by more than that are all
    chosen whatever the order; the places left go to the newest of those within it, found by a
    second ``topk`` over their positions. No branch depends on the data and nothing waits on the
    device, so a CUDA graph can capture it. Rows whose k-th score is -inf (fewer than k finite)
    keep ``topk``'s choice. scores: (..., M), positions: (..., M) or None (distinct within a row,
    >= 0). Returns scores (..., k), descending but for the order among ties, and int64 column
    indices (..., k)."""
    top, index = scores.topk(k, dim=-1)  # (..., k)
    kth = top[..., -1:]  # (..., 1)
    if positions is None:
        positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)  # (..., M)
    eps = torch.finfo(torch.float32).eps
    finite = torch.isfinite(kth)  # (..., 1)
    tol = NEAR_TIE_ULPS * eps * torch.where(finite, kth.abs(), 0).clamp(min=1)  # (..., 1)
    above = (top > kth + tol).sum(-1, keepdim=True)  # (..., 1): places taken by clearly better scores
    near = finite & ((scores - kth).abs() <= tol)  # (..., M)
    tied = torch.where(near, positions, positions.new_full((), -1))  # (..., M): positions of the ties
    newest = tied.topk(k, dim=-1).indices  # (..., k): columns of the tied entries, newest first
    place = torch.arange(k, device=scores.device)  # (k,)
    from_tied = (place >= above) & finite  # (..., k)
    columns = torch.where(from_tied, newest.gather(-1, (place - above).clamp(min=0)), index)  # (..., k)
    # gathered at the chosen columns (not the k-th score repeated), so a gradient reaches the entries chosen
    return scores.gather(-1, columns), columns  # (..., k) twice


def exact_topk(queries: Tensor, keys: Tensor, k: int, key_block: int = 1 << 20) -> tuple[Tensor, Tensor]:
    """Top-``k`` keys by ``q . key`` for every query. queries: (Q, D), keys: (M, D).

    Returns scores (Q, k) in float32, descending, and int64 indices (Q, k) into ``keys``.
    """
    n = keys.shape[0]
    if n == 0:
        raise ValueError("cannot search an empty set of keys")
    k = min(k, n)
    best_scores, best_index = None, None
    for start in range(0, n, key_block):
        block = keys[start : start + key_block]  # (Mb, D)
        scores = (queries @ block.T).float()  # (Q, Mb)
        top_s, top_i = topk_newest_first(scores, min(k, block.shape[0]))  # (Q, k)
        top_i = top_i + start  # (Q, k)
        if best_scores is None:
            best_scores, best_index = top_s, top_i
            continue
        best_scores, best_index = merge_topk(best_scores, best_index, top_s, top_i, k)  # (Q, k) twice
    return best_scores, best_index


def merge_topk(best_scores: Tensor, best_index: Tensor, scores: Tensor, index: Tensor,
               k: int) -> tuple[Tensor, Tensor]:
    """The best ``k`` of two partial top-k lists along the last dimension (scores and their indices),
    descending, equal scores newest (larger index) first: how a blocked search folds each block
    into what it has found so far, exactly as one search over all the entries would choose."""
    merged_s = torch.cat([best_scores, scores], dim=-1)  # (..., k + k')
    merged_i = torch.cat([best_index, index], dim=-1)  # (..., k + k')
    top, order = topk_newest_first(merged_s, k, merged_i)  # (..., k)
    return top, merged_i.gather(-1, order)  # (..., k) twice


def exact_topk_ref(queries: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Brute force: every score at once, then a full sort."""
    scores = queries.double() @ keys.double().T  # (Q, M)
    order = scores.argsort(dim=-1, descending=True)[:, :k]  # (Q, k)
    return scores.gather(-1, order), order
