"""Exact top-K memory read, searched in blocks of queries so the score matrix stays bounded.

Visibility follows the stream: a token that has seen ``n`` completed chunks may read entries of
chunks ``n - capacity <= id < n``, exactly what a FIFO memory of ``capacity`` entries would hold
if the stream were fed one token at a time. This is what makes a long call equal to many short
ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from horizonlm.ops.topk_read import topk_read, visible_mask

__all__ = ["memory_read", "memory_topk_ids", "visible_mask"]


def _top_visible(q: Tensor, keys: Tensor, entry_ids: Tensor, seen: Tensor, capacity: int,
                 k: int) -> tuple[Tensor, Tensor]:
    """The K best visible entries of a block of queries: scores (-inf where fewer than K are
    visible) and indices into ``keys``. One selection serves the read and the diagnostics; it
    never builds the (Lb, M) score matrix (see ``ops.topk_read``)."""
    return topk_read(q, keys, entry_ids, seen, capacity, k)  # (B, Lb, K) twice


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
) -> Tensor:
    """``r_t = sum_{j in topK} softmax(tau * q_t . k_j) v_j`` over the visible entries.

    queries: (B, L, Dk), keys: (B, M, Dk), values: (B, M, Dv), entry_ids: (M,),
    completed_before: (L,). A token with no visible entry reads zeros. Returns (B, L, Dv).
    """
    batch, length, _ = queries.shape
    n_entries = keys.shape[1]
    if n_entries == 0:
        return queries.new_zeros(batch, length, values.shape[-1])  # (B, L, Dv)
    k = min(top_k, n_entries)
    batch_index = torch.arange(batch, device=queries.device).view(batch, 1, 1)  # (B, 1, 1)
    reads = []
    for start in range(0, length, block):
        q = queries[:, start : start + block]  # (B, Lb, Dk)
        top_scores, top_index = _top_visible(q, keys, entry_ids, completed_before[start : start + block], capacity, k)
        valid = torch.isfinite(top_scores)  # (B, Lb, K)
        logits = (tau * top_scores).masked_fill(~valid, -1e4)  # (B, Lb, K); finite, so no NaN anywhere
        weights = torch.softmax(logits, dim=-1) * valid  # (B, Lb, K); all zero where nothing is visible
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
    (B, L, K) int64."""
    batch, length, _ = queries.shape
    k = min(top_k, keys.shape[1])
    if k == 0:
        return torch.full((batch, length, top_k), -1, dtype=torch.long, device=queries.device)  # (B, L, K)
    picked = []
    for start in range(0, length, block):
        q = queries[:, start : start + block]  # (B, Lb, Dk)
        top_scores, top_index = _top_visible(q, keys, entry_ids, completed_before[start : start + block], capacity, k)
        ids = (entry_ids if labels is None else labels)[top_index]  # (B, Lb, K)
        picked.append(ids.masked_fill(~torch.isfinite(top_scores), -1))  # (B, Lb, K)
    return torch.cat(picked, dim=1)  # (B, L, K)
