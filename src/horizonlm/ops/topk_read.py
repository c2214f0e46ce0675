"""The top-K visible entries of a retrieval memory for every query, without the (L, M) score matrix.

Query t scores entry m by ``s[t, m] = q_t . k_m`` (unit vectors: a cosine) if m is visible to t,

    completed_before[t] - capacity <= entry_ids[m] < completed_before[t],

and ``-inf`` otherwise; the read takes the K entries of largest ``s`` per query (scores ``-inf``
where fewer than K are visible). Entries are kept in stream order, so ``entry_ids`` is
non-decreasing (a precondition of every function here) and the entries a block of queries can
see are one contiguous range, found by binary search; entries outside it are never scored.

On the GPU a Triton kernel streams over that range: a program holds BLOCK_L queries, scores a
block of BLOCK_M entries with one ``tl.dot``, masks the invisible ones, and merges the block into
a running (BLOCK_L, K) top-K tile kept on chip. The merge first counts, per query, the block's
finite scores at or above its current K-th best; only as many rounds of "move the block's maximum
into the slot of the current minimum" run as the largest count (at most K), so once a query's
K-th best is high the typical block costs one compare and one sum. When the queries are few
(decode: one token) the range is cut into parts searched by programs of their own, whose lists
torch merges. ``topk_visible_torch`` is the twin, a loop over entry blocks with a running
``topk`` merge (as ``topk_search.exact_topk``), used on the CPU; ``topk_visible_dense`` scores
every entry at once and is the obviously correct reference.

All three rank equal scores newest first (``topk_search.topk_newest_first``), as the model's
read does: they choose the top K under the order (score descending, then entry index descending),
torch counting scores within a few ulps of the K-th as equal to it (so that the last bits of a
matrix product of another shape do not choose). In the kernel a round takes the block's maximum
of largest column among equal maxima, and it replaces the kept entry of smallest (score, index)
-- an empty slot (-inf) first -- if it is greater in that order (never a -inf candidate); the
split parts and the final cut to K are merged in torch by ``topk_newest_first`` with the entry
indices as positions. So the kernel in float32 agrees with the float32 torch paths id for id
wherever tied scores are exactly equal in both (as identical keys' scores normally are; the
interpreter test uses scores exact in float32, so that no summation order can split a tie);
near-ties, scores within rounding of each other, can still be ordered differently, since the
kernel's products (tf32x3 on the GPU) do not round as torch's do and its exact order inside a
part can drop a near-tied newer entry before the merge sees it. ``memory_read`` selects with
:func:`topk_read` (the kernel on CUDA, checked on an H200 by ``horizon bench memory --read``).

The selection is not differentiable; :func:`topk_read` chooses under ``no_grad`` and recomputes
the chosen scores ``q_t . k_idx`` in torch, so gradients reach the queries and the keys.
"""

from __future__ import annotations

import torch
from torch import Tensor

from horizonlm.ops.topk_search import merge_topk, topk_newest_first

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def visible_mask(entry_ids: Tensor, completed_before: Tensor, capacity: int) -> Tensor:
    """(L, M) bool: entry m is visible to token t."""
    ids = entry_ids.unsqueeze(0)  # (1, M)
    seen = completed_before.unsqueeze(1)  # (L, 1)
    return (ids < seen) & (ids >= seen - capacity)  # (L, M)


def visible_counts(entry_ids: Tensor, completed_before: Tensor, capacity: int,
                   live_from: Tensor | None = None) -> Tensor:
    """How many entries each token sees, ``visible_mask(...).sum(-1)`` by two binary searches
    (entry ids ascend, as a memory holds them), without the (L, M) mask: (L,) int64. With
    ``live_from`` (B,) (a stream restarted cold: its entries of chunks before it are not its own)
    only entries of chunks ``>= live_from[b]`` count, per stream: (B, L)."""
    ids = entry_ids.contiguous()  # (M,)
    seen = completed_before.to(ids.dtype)  # (L,)
    first = seen - capacity  # (L,)
    if live_from is not None:
        first = torch.maximum(first, live_from.to(ids.dtype).unsqueeze(-1))  # (B, L)
    return (torch.searchsorted(ids, seen) - torch.searchsorted(ids, first)).clamp(min=0)  # (L,) or (B, L)


def visible_range(entry_ids: Tensor, completed_before: Tensor, capacity: int, block: int) -> tuple[Tensor, Tensor]:
    """For each block of ``block`` queries, the entries any of them may see: ``[lo, hi)``, each
    (ceil(L / block),) int64. A binary search per block, on the device, so nothing waits on it."""
    length = completed_before.shape[0]
    pad = -length % block
    seen = torch.cat([completed_before, completed_before[-1:].expand(pad)]).view(-1, block)  # (L/block, block)
    first = (seen.amin(dim=1) - capacity).to(entry_ids.dtype)  # (L/block,)
    last = seen.amax(dim=1).to(entry_ids.dtype)  # (L/block,)
    ids = entry_ids.contiguous()  # (M,)
    return torch.searchsorted(ids, first), torch.searchsorted(ids, last)  # (L/block,) twice


def topk_visible_dense(q: Tensor, keys: Tensor, entry_ids: Tensor, completed_before: Tensor, capacity: int,
                       k: int) -> tuple[Tensor, Tensor]:
    """Every score at once, then ``topk``: the reference. q: (B, L, Dk), keys: (B, M, Dk), k <= M.
    Returns scores (B, L, K) in q's dtype, descending, and int64 indices (B, L, K) into keys."""
    scores = torch.einsum("bld,bmd->blm", q, keys)  # (B, L, M)
    mask = visible_mask(entry_ids, completed_before, capacity)  # (L, M)
    scores = scores.masked_fill(~mask, float("-inf"))  # (B, L, M)
    return topk_newest_first(scores, k)  # (B, L, K) twice


def _empty_selection(q: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Nothing chosen yet: scores -inf, indices 0 (a safe gather wherever the memory is not empty)."""
    batch, length, _ = q.shape
    scores = q.new_full((batch, length, k), float("-inf"))  # (B, L, K)
    index = torch.zeros(batch, length, k, dtype=torch.long, device=q.device)  # (B, L, K)
    return scores, index


def topk_visible_torch(q: Tensor, keys: Tensor, entry_ids: Tensor, completed_before: Tensor, capacity: int,
                       k: int, query_block: int = 1024, entry_block: int = 8192) -> tuple[Tensor, Tensor]:
    """The twin: per block of queries, only the entries of its visible range, ``entry_block`` at a
    time, each block's ``topk`` merged into the running best; at most (B, query_block,
    entry_block) scores exist at once. Same arguments and result as :func:`topk_visible_dense`,
    except that K may exceed the visible entries (and M): missing slots score -inf, index 0."""
    best_scores, best_index = _empty_selection(q, k)
    if q.shape[1] == 0 or keys.shape[1] == 0:
        return best_scores, best_index
    lo, hi = visible_range(entry_ids, completed_before, capacity, query_block)
    for i, (start, stop) in enumerate(zip(lo.tolist(), hi.tolist())):
        rows = slice(i * query_block, (i + 1) * query_block)
        qb, seen = q[:, rows], completed_before[rows]  # (B, Lb, Dk), (Lb,)
        best_s, best_i = best_scores[:, rows], best_index[:, rows]  # (B, Lb, K) twice
        for m0 in range(start, stop, entry_block):
            m1 = min(m0 + entry_block, stop)
            scores = torch.einsum("bld,bmd->blm", qb, keys[:, m0:m1])  # (B, Lb, Mb)
            scores = scores.masked_fill(~visible_mask(entry_ids[m0:m1], seen, capacity), float("-inf"))  # (B, Lb, Mb)
            top_s, top_i = topk_newest_first(scores, min(k, m1 - m0))  # (B, Lb, k')
            best_s, best_i = merge_topk(best_s, best_i, top_s, top_i + m0, k)  # (B, Lb, K) twice
        best_scores[:, rows], best_index[:, rows] = best_s, best_i
    return best_scores, best_index.masked_fill(torch.isinf(best_scores), 0)  # (B, L, K) twice


if triton is not None:

    @triton.jit
    def _topk_visible_kernel(q_ptr, k_ptr, ids_ptr, seen_ptr, lo_ptr, hi_ptr, scores_ptr, index_ptr, length,
                             n_entries, dim, capacity, n_split, SLOTS: tl.constexpr, DIM: tl.constexpr,
                             BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
        pid_l = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        part = tl.program_id(2)
        t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        t_ok = t < length
        d = tl.arange(0, DIM)
        d_ok = d < dim
        q = tl.load(q_ptr + (row * length + t)[:, None] * dim + d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                    other=0.0)
        seen = tl.load(seen_ptr + t, mask=t_ok, other=0)
        first = seen - capacity
        slots = tl.arange(0, SLOTS)
        cols = tl.arange(0, BLOCK_M)
        best = tl.full((BLOCK_L, SLOTS), float("-inf"), tl.float32)
        best_at = tl.zeros((BLOCK_L, SLOTS), tl.int64)
        lo = tl.load(lo_ptr + pid_l)
        hi = tl.load(hi_ptr + pid_l)
        per_part = (hi - lo + n_split * BLOCK_M - 1) // (n_split * BLOCK_M) * BLOCK_M
        start = lo + part * per_part
        stop = tl.minimum(hi, start + per_part)
        for m0 in range(start, stop, BLOCK_M):
            m = m0 + cols
            m_ok = m < stop
            keys_t = tl.load(k_ptr + (row * n_entries + m)[None, :] * dim + d[:, None],
                             mask=d_ok[:, None] & m_ok[None, :], other=0.0)
            s = tl.dot(q, keys_t, input_precision=PRECISION)
            ids = tl.load(ids_ptr + m, mask=m_ok, other=0)
            visible = (ids[None, :] < seen[:, None]) & (ids[None, :] >= first[:, None]) & m_ok[None, :]
            s = tl.where(visible & t_ok[:, None], s, float("-inf"))
            # Entries rank by (score, entry index) descending: equal scores newest first. Only a
            # finite score at or above the current worst kept one can enter; the block's best
            # candidates come out in that order, so as many rounds as there are such (at most
            # SLOTS) suffice.
            floor = tl.min(best, axis=1)
            can = (s >= floor[:, None]) & (s > float("-inf"))
            rounds = tl.minimum(tl.max(tl.sum(can.to(tl.int32), axis=1)), SLOTS)
            for _ in range(rounds):
                top = tl.max(s, axis=1)
                top_at = tl.max(tl.where(s == top[:, None], cols[None, :], -1), axis=1)  # newest of equal maxima
                floor = tl.min(best, axis=1)
                at_floor = best == floor[:, None]
                floor_at = tl.min(tl.where(at_floor, best_at, hi), axis=1)  # oldest of equal minima
                worst = tl.min(tl.where(at_floor & (best_at == floor_at[:, None]), slots[None, :], SLOTS), axis=1)
                # A candidate of this block is newer than any entry of earlier blocks, but not
                # than one it already placed, so an equal score compares the entry indices.
                wins = (top > floor) | ((top == floor) & (m0 + top_at > floor_at))
                put = (slots[None, :] == worst[:, None]) & (wins & (top > float("-inf")))[:, None]
                best = tl.where(put, top[:, None], best)
                best_at = tl.where(put, m0 + top_at[:, None], best_at)
                s = tl.where(cols[None, :] == top_at[:, None], float("-inf"), s)
        out = ((row * length + t) * n_split + part)[:, None] * SLOTS + slots[None, :]
        tl.store(scores_ptr + out, best, mask=t_ok[:, None])
        tl.store(index_ptr + out, best_at, mask=t_ok[:, None])


_BLOCK_L = 64
QUERY_TILE = _BLOCK_L
"""Queries per program of the kernel: each program reads every visible key once."""
_BLOCK_M = 128
_PRECISION = "tf32x3"
"""float32 products as three TF32 products (error near float32 rounding, so the kernel chooses
what the float32 torch path chooses but for near-ties): on an H200 at L = 65,536, M = 2**20,
Dk = 128, 0.41 s against 1.6 s for "ieee" (CUDA-core FMAs) and 0.17 s for plain "tf32"."""


def _split(device: torch.device, programs: int, n_entries: int, block_m: int) -> int:
    """Into how many parts to cut each query block's entry range so that a few queries (decode:
    one) still fill the GPU, about 4 programs per SM, each part at least 4 entry blocks; 1 for
    a long call, which has programs enough."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(triton.cdiv(4 * sms, programs), n_entries // (4 * block_m)))


def topk_visible_triton(q: Tensor, keys: Tensor, entry_ids: Tensor, completed_before: Tensor, capacity: int, k: int,
                        block_l: int = _BLOCK_L, block_m: int = _BLOCK_M, precision: str = _PRECISION,
                        split: int | None = None) -> tuple[Tensor, Tensor]:
    """The same as :func:`topk_visible_torch` by the Triton kernel (any device Triton runs on, its
    CPU interpreter included), with float32 scores. q and keys are read in their common dtype
    (float32, bfloat16 or float16), products summed in float32. block_l and block_m (powers of
    two, >= 16) are the query and entry tiles; ``split`` parts of each entry range are searched
    by programs of their own and their top-K lists merged here (default: by :func:`_split`)."""
    if triton is None:
        raise RuntimeError("topk_visible_triton needs the triton package")
    batch, length, dim = q.shape
    n_entries = keys.shape[1]
    if length == 0 or n_entries == 0:
        scores, index = _empty_selection(q, k)
        return scores.float(), index
    dtype = torch.promote_types(q.dtype, keys.dtype)
    slots = max(2, triton.next_power_of_2(k))
    n_blocks = triton.cdiv(length, block_l)
    split = split or _split(q.device, n_blocks * batch, n_entries, block_m)
    scores = torch.empty(batch, length, split * slots, device=q.device, dtype=torch.float32)  # (B, L, P*S)
    index = torch.empty(batch, length, split * slots, device=q.device, dtype=torch.long)  # (B, L, P*S)
    seen = completed_before.to(torch.long).contiguous()  # (L,)
    ids = entry_ids.to(torch.long).contiguous()  # (M,)
    lo, hi = visible_range(ids, seen, capacity, block_l)  # (L/block_l,) twice
    _topk_visible_kernel[(n_blocks, batch, split)](
        q.to(dtype).contiguous(), keys.to(dtype).contiguous(), ids, seen, lo, hi, scores, index, length, n_entries,
        dim, capacity, split, SLOTS=slots, DIM=max(16, triton.next_power_of_2(dim)), BLOCK_L=block_l,
        BLOCK_M=block_m, PRECISION=precision)
    scores, order = topk_newest_first(scores, k, index)  # (B, L, K): the parts merged, equal scores newest first
    return scores, index.gather(-1, order)  # (B, L, K) twice


@torch.no_grad()
def topk_visible(q: Tensor, keys: Tensor, entry_ids: Tensor, completed_before: Tensor, capacity: int,
                 k: int) -> tuple[Tensor, Tensor]:
    """The selection: the Triton kernel on a CUDA device (float32, bfloat16, float16), the torch
    twin otherwise (CPU, float64). Scores (B, L, K) descending, -inf where fewer than K entries
    are visible (their index is 0), and int64 indices (B, L, K) into keys."""
    if triton is not None and q.is_cuda and torch.float64 not in (q.dtype, keys.dtype):
        return topk_visible_triton(q, keys, entry_ids, completed_before, capacity, k)
    return topk_visible_torch(q, keys, entry_ids, completed_before, capacity, k)


def topk_read(q: Tensor, keys: Tensor, entry_ids: Tensor, completed_before: Tensor, capacity: int,
              k: int, selection_keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`topk_visible` with differentiable scores: the chosen ``q_t . k_idx`` recomputed in
    torch (in q's dtype), so gradients reach q and keys through autograd. ``selection_keys``, if
    given, are the keys the selection scores against instead of ``keys`` (the same entries in
    another dtype; q is cast to theirs): ``memory_read`` passes them cast once to autocast's dtype.
    Returns scores (B, L, K) and indices (B, L, K)."""
    pick = keys.detach() if selection_keys is None else selection_keys  # (B, M, Dk)
    chosen, index = topk_visible(q.detach().to(pick.dtype), pick, entry_ids, completed_before, capacity, k)
    batch_index = torch.arange(q.shape[0], device=q.device).view(-1, 1, 1)  # (B, 1, 1)
    picked = keys[batch_index, index]  # (B, L, K, Dk)
    scores = torch.einsum("bld,blkd->blk", q, picked)  # (B, L, K)
    return scores.masked_fill(torch.isinf(chosen), float("-inf")), index  # (B, L, K) twice
