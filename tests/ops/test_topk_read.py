"""The top-K visible-entry selection: the blocked torch twin against the dense reference in
float64, the Triton kernel (run by Triton's CPU interpreter) against it in float32, and the
memory read's gradients through the new selection against those through the dense one."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from horizonlm.ops.chunks import chunk_layout
from horizonlm.ops.memory_read import memory_read, memory_topk_ids
from horizonlm.ops.topk_read import (
    topk_read,
    topk_visible,
    topk_visible_dense,
    topk_visible_torch,
    visible_mask,
    visible_range,
)

from .triton_interpreter import assert_passes_in_interpreter


def _stream(batch: int, dim: int, chunk: int, pos: int, length: int, carried: int, per_token: bool, seed: int,
            dtype: torch.dtype = torch.float64):
    """Random unit keys and queries laid out as a memory call sees them: ``carried`` chunks of
    entries from earlier calls, then this call's (one per chunk, or one per token), ids ascending."""
    g = torch.Generator().manual_seed(seed)
    layout = chunk_layout(pos, length, chunk)
    first = pos // chunk - carried
    if per_token:
        ids = torch.cat([torch.arange(first, pos // chunk).repeat_interleave(chunk), layout.completed_before])  # (M,)
    else:
        ids = torch.cat([torch.arange(first, pos // chunk), layout.chunk_ids])  # (M,)
    keys = F.normalize(torch.randn(batch, ids.numel(), dim, generator=g, dtype=dtype), dim=-1)  # (B, M, Dk)
    queries = F.normalize(torch.randn(batch, length, dim, generator=g, dtype=dtype), dim=-1)  # (B, L, Dk)
    return queries, keys, ids, layout.completed_before


def _assert_same_selection(scores, index, ref_scores, ref_index, k: int, tol: float) -> None:
    """Same finite slots, same chosen entries there (random keys: no ties), scores close; -inf
    padding beyond the visible entries and beyond the memory."""
    kk = ref_scores.shape[-1]
    finite = torch.isfinite(ref_scores)  # (B, L, K')
    assert scores.shape == index.shape == ref_scores.shape[:-1] + (k,)
    assert torch.equal(torch.isfinite(scores[..., :kk]), finite)
    assert torch.isneginf(scores[..., kk:]).all()
    assert torch.equal(index[..., :kk][finite], ref_index[finite])
    assert (index[torch.isinf(scores)] == 0).all()
    torch.testing.assert_close(scores[..., :kk][finite].double(), ref_scores[finite].double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("pos,length,carried,capacity,top_k,per_token,blocks", [
    (9, 23, 2, 3, 4, False, (5, 3)),
    (0, 30, 0, 100, 3, False, (7, 2)),
    (13, 19, 3, 2, 8, True, (4, 5)),
    (5, 17, 1, 4, 32, True, (1024, 8192)),
])
def test_torch_twin_matches_dense(pos: int, length: int, carried: int, capacity: int, top_k: int, per_token: bool,
                                  blocks: tuple[int, int]) -> None:
    q, keys, ids, seen = _stream(2, 6, 4, pos, length, carried, per_token, seed=pos + length)
    k = min(top_k, ids.numel())
    ref = topk_visible_dense(q, keys, ids, seen, capacity, k)
    got = topk_visible_torch(q, keys, ids, seen, capacity, top_k, query_block=blocks[0], entry_block=blocks[1])
    _assert_same_selection(*got, *ref, top_k, tol=1e-12)
    assert torch.isneginf(got[0]).any() and torch.isfinite(got[0]).any()  # some tokens see fewer than K


def test_visibility_at_chunk_boundaries() -> None:
    """A token reads chunks ``seen - capacity <= id < seen`` exactly: all of them while there are
    fewer than K, never its own chunk, never one that fell out of the window."""
    ids = torch.arange(6).repeat_interleave(2)  # (12,): two entries per chunk
    seen = torch.tensor([0, 1, 1, 2, 3, 4, 5, 6])  # (8,)
    g = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(1, 12, 5, generator=g, dtype=torch.float64), dim=-1)  # (1, M, Dk)
    q = F.normalize(torch.randn(1, 8, 5, generator=g, dtype=torch.float64), dim=-1)  # (1, L, Dk)
    scores, index = topk_visible_torch(q, keys, ids, seen, capacity=2, k=6, query_block=3, entry_block=5)
    for t, s in enumerate(seen.tolist()):
        chosen = sorted(index[0, t][torch.isfinite(scores[0, t])].tolist())
        assert chosen == [m for m in range(12) if s - 2 <= int(ids[m]) < s]
    lo, hi = visible_range(ids, seen, 2, block=3)
    mask = visible_mask(ids, seen, 2)  # (L, M)
    for b in range(3):
        rows = mask[3 * b : 3 * b + 3].any(0).nonzero().flatten()  # entries some token of the block sees
        assert rows.numel() == 0 or (lo[b] <= rows.min() and rows.max() < hi[b])
        block_seen = seen[3 * b : 3 * b + 3]  # (<=3,)
        inside = (ids >= block_seen.min() - 2) & (ids < block_seen.max())  # (M,)
        assert hi[b] - lo[b] == int(inside.sum())  # the block's window, no more


def test_empty_memory_and_nothing_visible() -> None:
    q = F.normalize(torch.randn(2, 5, 4, dtype=torch.float64), dim=-1)  # (B, L, Dk)
    empty = torch.zeros(2, 0, 4, dtype=torch.float64)  # (B, 0, Dk)
    scores, index = topk_visible(q, empty, torch.zeros(0, dtype=torch.long), torch.arange(5), 3, 4)
    assert scores.shape == (2, 5, 4) and torch.isneginf(scores).all() and (index == 0).all()
    keys = F.normalize(torch.randn(2, 3, 4, dtype=torch.float64), dim=-1)  # (B, M, Dk)
    scores, index = topk_visible(q, keys, torch.tensor([7, 8, 9]), torch.arange(5), 3, 2)
    assert torch.isneginf(scores).all() and (index == 0).all()
    picked = memory_topk_ids(q, keys, torch.tensor([7, 8, 9]), torch.arange(5), 3, 2)
    assert (picked == -1).all()


def test_gradients_through_the_new_selection_equal_the_dense_ones() -> None:
    """memory_read (whatever it does with the chosen scores) gives the same output and gradients
    whether the selection is the blocked one or the dense one; so do the chosen scores alone."""
    q, keys, ids, seen = _stream(2, 6, 4, pos=10, length=21, carried=3, per_token=True, seed=3)
    values = torch.randn(2, ids.numel(), 5, dtype=torch.float64)  # (B, M, Dv)
    inputs = [t.clone().requires_grad_() for t in (q, keys, values)]
    g_out = torch.randn(2, 21, 5, dtype=torch.float64)  # (B, L, Dv)

    def run(reference: bool) -> tuple[torch.Tensor, ...]:
        out = memory_read(*inputs, ids, seen, 3, 4, 5.0, block=8, null_score=torch.tensor([0.3], dtype=torch.float64),
                          reference=reference)  # (B, L, Dv)
        return (out, *torch.autograd.grad((out * g_out).sum(), inputs))

    new, dense = run(False), run(True)
    assert new[0].abs().sum() > 0
    for a, b in zip(new, dense):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    qr, kr = (t.clone().requires_grad_() for t in (q, keys))
    s_new, i_new = topk_read(qr, kr, ids, seen, 3, 4)
    s_ref, i_ref = topk_visible_dense(qr, kr, ids, seen, 3, 4)
    w = torch.randn(s_new.shape, dtype=torch.float64)  # (B, L, K)
    grads = [torch.autograd.grad((s.masked_fill(torch.isinf(s), 0) * w).sum(), (qr, kr)) for s in (s_new, s_ref)]
    assert torch.equal(i_new[torch.isfinite(s_ref)], i_ref[torch.isfinite(s_ref)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


_TRITON_CHECK = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from horizonlm.ops.topk_read import topk_visible_dense, topk_visible_triton
    from tests.ops.test_topk_read import _assert_same_selection, _stream
    cases = [  # pos, length, carried, capacity, top_k, per_token: L and M not multiples of 16
        (9, 37, 2, 3, 4, True),
        (0, 21, 0, 100, 8, True),
        (13, 19, 3, 2, 32, False),
    ]
    for pos, length, carried, capacity, top_k, per_token in cases:
        q, keys, ids, seen = _stream(2, 20, 4, pos, length, carried, per_token, seed=pos, dtype=torch.float32)
        k = min(top_k, ids.numel())
        ref = topk_visible_dense(q.double(), keys.double(), ids, seen, capacity, k)
        for split in (1, 3):  # 3: each block's entry range searched in three parts, merged after
            got = topk_visible_triton(q, keys, ids, seen, capacity, top_k, block_l=16, block_m=16, split=split)
            assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
            _assert_same_selection(*got, *ref, top_k, tol=1e-5)
    # Half-width inputs: float16 (the interpreter multiplies bfloat16 as raw integers, so bfloat16
    # is checked on the GPU, by ``horizon bench memory --read``).
    q, keys, ids, seen = _stream(1, 20, 4, 9, 37, 2, True, seed=1, dtype=torch.float16)
    got = topk_visible_triton(q, keys, ids, seen, 3, 8, block_l=16, block_m=16)
    ref = topk_visible_dense(q.double(), keys.double(), ids, seen, 3, 8)
    _assert_same_selection(*got, *ref, 8, tol=1e-5)
    scores, index = topk_visible_triton(q, keys[:, :0], ids[:0], seen, 3, 8)
    assert torch.isneginf(scores).all() and (index == 0).all() and scores.shape == (1, 37, 8)
    print("ok")
""")


def test_triton_kernel_matches_dense_in_interpreter() -> None:
    assert_passes_in_interpreter(_TRITON_CHECK, timeout=300)


_TRITON_TIES_CHECK = textwrap.dedent("""
    import torch
    from horizonlm.ops.topk_read import topk_visible_dense, topk_visible_triton, visible_mask
    from tests.ops.test_topk_read import _stream

    def dyadic(shape, g):  # multiples of 1/4 in [-1, 1]: every product and sum of 20 is exact in float32
        return torch.randint(-4, 5, shape, generator=g).float() / 4

    g = torch.Generator().manual_seed(0)
    q, _, ids, seen = _stream(2, 20, 4, 13, 41, 4, True, seed=0, dtype=torch.float32)  # M = 57 entries
    n = ids.numel()
    pool = dyadic((2, 3, 20), g)  # (B, 3, Dk): three keys, each copied into many entries
    some_copied = dyadic((2, n, 20), g)  # (B, M, Dk)
    copied = torch.rand(n, generator=g) < 0.6  # (M,)
    some_copied[:, copied] = pool[:, torch.randint(0, 3, (int(copied.sum()),), generator=g)]
    all_same = pool[:, :1].expand(2, n, 20).contiguous()  # (B, M, Dk): every visible entry ties
    q = dyadic(q.shape, g)  # (B, L, Dk)
    mask = visible_mask(ids, seen, 12)  # (L, M)
    tied_at_kth = 0
    for keys in (some_copied, all_same):
        exact = torch.einsum("bld,bmd->blm", q.double(), keys.double()).masked_fill(~mask, float("-inf"))
        for k in (4, 8):
            ref_s, ref_i = topk_visible_dense(q, keys, ids, seen, 12, k)
            for split in (1, 3):
                s, i = topk_visible_triton(q, keys, ids, seen, 12, k, block_l=16, block_m=16, split=split)
                finite = torch.isfinite(ref_s)  # (B, L, K)
                assert torch.equal(torch.isfinite(s), finite)
                assert torch.equal(s[finite], ref_s[finite])  # exact: no rounding anywhere
                assert torch.equal(i.masked_fill(~finite, -1).sort(-1).values,
                                   ref_i.masked_fill(~finite, -1).sort(-1).values)
                for b in range(2):  # the chosen among those tied at the k-th place are the newest
                    for t in range(q.shape[1]):
                        if not finite[b, t, -1]:
                            continue
                        kth = s[b, t, -1].item()
                        at_kth = (exact[b, t] == kth).nonzero().flatten()  # ascending entry index
                        chosen = sorted(m for m in i[b, t].tolist() if exact[b, t, m] == kth)
                        assert chosen == at_kth[-len(chosen):].tolist(), (b, t, chosen, at_kth)
                        tied_at_kth += at_kth.numel() > len(chosen)
    assert tied_at_kth > 100, tied_at_kth  # the ties are really cut at the k-th place
    print("ok")
""")


def test_triton_kernel_breaks_exact_ties_newest_first_in_interpreter() -> None:
    """Keys copied into several entries (and a memory of one key throughout) so that many
    entries score exactly the same for a query, more than K at the K-th place, in windows that
    cut through them, across entry blocks and split parts: the kernel picks the same entries as
    the dense reference, the newest of the tied ones."""
    assert_passes_in_interpreter(_TRITON_TIES_CHECK, timeout=300)


def test_selection_keys_choose_while_the_scores_stay_in_q_dtype() -> None:
    """topk_read chooses against ``selection_keys`` (here bfloat16, where two near keys tie and the
    newest wins) and recomputes the chosen score from ``keys`` in q's dtype."""
    q = F.normalize(torch.tensor([[[1.0, 0.0, 0.0, 0.0]]]), dim=-1)  # (1, 1, 4)
    keys = F.normalize(torch.tensor([[[1.0, 1e-3, 0.0, 0.0], [1.0, 2e-3, 0.0, 0.0]]]), dim=-1)  # (1, 2, 4)
    ids, seen = torch.tensor([0, 1]), torch.tensor([2])
    scores, index = topk_read(q, keys, ids, seen, 4, 1)
    assert index.item() == 0
    scores, index = topk_read(q, keys, ids, seen, 4, 1, selection_keys=keys.to(torch.bfloat16))
    assert index.item() == 1 and scores.dtype == torch.float32
    assert scores.item() == (q[0, 0] @ keys[0, 1]).item()
