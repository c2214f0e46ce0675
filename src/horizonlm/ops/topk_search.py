"""Exact maximum-inner-product search, blocked over the keys so no score matrix larger than
``queries x key_block`` is ever built; partial top-k lists are merged block by block."""

from __future__ import annotations

import torch
from torch import Tensor


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
        top_s, top_i = scores.topk(min(k, block.shape[0]), dim=-1)  # (Q, k)
        top_i = top_i + start  # (Q, k)
        if best_scores is None:
            best_scores, best_index = top_s, top_i
            continue
        best_scores, best_index = merge_topk(best_scores, best_index, top_s, top_i, k)  # (Q, k) twice
    return best_scores, best_index


def merge_topk(best_scores: Tensor, best_index: Tensor, scores: Tensor, index: Tensor,
               k: int) -> tuple[Tensor, Tensor]:
    """The best ``k`` of two partial top-k lists along the last dimension (scores and their indices),
    descending: how a blocked search folds each block into what it has found so far."""
    merged_s = torch.cat([best_scores, scores], dim=-1)  # (..., k + k')
    merged_i = torch.cat([best_index, index], dim=-1)  # (..., k + k')
    top, order = merged_s.topk(k, dim=-1)  # (..., k)
    return top, merged_i.gather(-1, order)  # (..., k) twice


def exact_topk_ref(queries: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Brute force: every score at once, then a full sort."""
    scores = queries.double() @ keys.double().T  # (Q, M)
    order = scores.argsort(dim=-1, descending=True)[:, :k]  # (Q, k)
    return scores.gather(-1, order), order
