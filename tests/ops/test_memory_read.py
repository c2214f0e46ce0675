"""The blocked top-K memory read against brute force in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from horizonlm.ops.chunks import chunk_layout
from horizonlm.ops.memory_read import memory_read, memory_topk_ids
from horizonlm.ops.reference import memory_read_ref


@pytest.mark.parametrize("carried,capacity,top_k,block", [(0, 100, 3, 4), (5, 6, 4, 3), (3, 4, 4, 100), (7, 7, 1, 5)])
def test_matches_brute_force(carried: int, capacity: int, top_k: int, block: int) -> None:
    g = torch.Generator().manual_seed(carried * 31 + capacity)
    batch, dim, chunk, pos, length = 2, 6, 4, carried * 4 + 1, 23
    layout = chunk_layout(pos, length, chunk)
    carried_ids = torch.arange(pos // chunk - carried, pos // chunk)
    ids = torch.cat([carried_ids, layout.chunk_ids])
    n = ids.numel()
    keys = F.normalize(torch.randn(batch, n, dim, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    values = torch.randn(batch, n, dim, generator=g, dtype=torch.float64, requires_grad=True)
    queries = F.normalize(torch.randn(batch, length, dim, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    args = (ids, layout.completed_before, capacity, top_k, 5.0)
    fast = memory_read(queries, keys, values, *args, block=block)
    ref = memory_read_ref(queries, keys, values, *args)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    assert fast.abs().sum() > 0
    g_out = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gf = torch.autograd.grad((fast * g_out).sum(), (queries, keys, values))
    gr = torch.autograd.grad((ref * g_out).sum(), (queries, keys, values))
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_nothing_visible_reads_zero_without_nan() -> None:
    keys = torch.randn(1, 3, 4, requires_grad=True)
    queries = torch.randn(1, 2, 4, requires_grad=True)
    ids = torch.tensor([5, 6, 7])
    out = memory_read(queries, keys, keys, ids, torch.tensor([0, 5]), capacity=10, top_k=2, tau=1.0)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(keys.grad).all() and torch.isfinite(queries.grad).all()


def test_chunk_layout_counts_from_stream_start() -> None:
    layout = chunk_layout(pos=6, length=7, chunk_size=4)  # positions 6..12
    assert layout.ends.tolist() == [1, 5]  # positions 7 and 11 end chunks 1 and 2
    assert layout.chunk_ids.tolist() == [1, 2]
    assert layout.completed_before.tolist() == [1, 1, 2, 2, 2, 2, 3]
    assert layout.completed_in_call_before.tolist() == [0, 0, 1, 1, 1, 1, 2]


def test_equal_scores_rank_newest_first_wherever_the_entries_sit() -> None:
    """Five entries tie for three places: the newest three are read, and the same ones when the
    matrix has invisible columns before them (a stream read in one call) or not (in pieces)."""
    from horizonlm.ops.topk_search import topk_newest_first

    tied = torch.tensor([[0.2, 0.7, 0.7, 0.9, 0.7, 0.7, 0.7, 0.1]])  # (1, M)
    top, index = topk_newest_first(tied, 3)
    assert sorted(index[0].tolist()) == [3, 5, 6] and top[0].tolist() == pytest.approx([0.9, 0.7, 0.7])
    padded = torch.cat([torch.full((1, 5), float("-inf")), tied], dim=1)  # (1, 5 + M)
    assert sorted((topk_newest_first(padded, 3)[1][0] - 5).tolist()) == [3, 5, 6]
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]]).flip(-1)  # reversed ages: the oldest ties now win
    assert sorted(topk_newest_first(tied, 3, positions)[1][0].tolist()) == [1, 2, 3]


def test_read_weights_give_finite_gradients_with_empty_slots() -> None:
    """Slots with no visible entry (-inf) get weight 0, and a learned scale tau and the null score
    get finite gradients through them (an inf times a zero gradient would be NaN)."""
    from horizonlm.ops.memory_read import read_weights

    scores = torch.tensor([[0.9, 0.2, float("-inf")], [float("-inf")] * 3], dtype=torch.float64)  # (2, K)
    tau = torch.tensor([10.0], dtype=torch.float64, requires_grad=True)  # (1,)
    null = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)  # (1,)
    weights = read_weights(scores, tau, null)  # (2, K)
    assert weights[0, 2] == 0 and (weights[1] == 0).all() and weights[0, 0] > weights[0, 1] > 0
    (weights * torch.arange(1.0, 4.0, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(tau.grad).all() and torch.isfinite(null.grad).all() and tau.grad != 0


def test_under_autocast_the_selection_scores_in_autocast_dtype() -> None:
    """Two keys whose cosines with the query differ by less than bfloat16 resolves: in float32
    the closer one is read; under bfloat16 autocast they tie, and the tie goes newest first (the
    other one). The read's weights and values stay float32 either way, and memory_topk_ids picks
    what the read picks."""
    q = F.normalize(torch.tensor([[[1.0, 0.0, 0.0, 0.0]]]), dim=-1)  # (1, 1, 4)
    keys = F.normalize(torch.tensor([[[1.0, 1e-3, 0.0, 0.0], [1.0, 2e-3, 0.0, 0.0]]]), dim=-1)  # (1, 2, 4)
    values = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2, 2)
    ids, seen = torch.tensor([0, 1]), torch.tensor([2])  # both entries visible

    def read() -> tuple[torch.Tensor, torch.Tensor]:
        out = memory_read(q, keys, values, ids, seen, capacity=4, top_k=1, tau=10.0)  # (1, 1, 2)
        return out, memory_topk_ids(q, keys, ids, seen, 4, 1, labels=torch.tensor([10, 11]))

    plain, plain_ids = read()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, low_ids = read()
    assert plain.dtype == low.dtype == torch.float32
    assert plain[0, 0].argmax() == 0 and plain_ids.item() == 10  # float32: the closer key, entry 0
    assert low[0, 0].argmax() == 1 and low_ids.item() == 11  # bfloat16: a tie, newest first


def test_under_autocast_the_fast_selection_gets_keys_cast_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton kernel ignores autocast, so memory_read hands the selection of a long call the
    keys already in autocast's dtype, cast once per call (the torch twin's products would follow
    autocast anyway); a call of one query tile or less (a decode step) reads them as they are."""
    import horizonlm.ops.memory_read as module

    seen_keys = []
    real = module.topk_read

    def spy(q, keys, entry_ids, completed_before, capacity, k, selection_keys=None):
        seen_keys.append(selection_keys)
        return real(q, keys, entry_ids, completed_before, capacity, k, selection_keys)

    monkeypatch.setattr(module, "topk_read", spy)
    length = 3 * module.QUERY_TILE
    q = F.normalize(torch.randn(1, length, 4), dim=-1)  # (1, L, 4)
    keys = F.normalize(torch.randn(1, 5, 4), dim=-1)  # (1, M, 4)
    ids, seen = torch.arange(5), torch.full((length,), 5)
    block = module.QUERY_TILE
    memory_read(q, keys, torch.randn(1, 5, 3), ids, seen, capacity=8, top_k=2, tau=10.0, block=block)
    assert seen_keys == [None] * 3
    seen_keys.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        memory_read(q, keys, torch.randn(1, 5, 3), ids, seen, capacity=8, top_k=2, tau=10.0, block=block)
        assert len(seen_keys) == 3 and all(k is seen_keys[0] for k in seen_keys)  # one cast serves every block
        assert seen_keys[0].dtype == torch.bfloat16 and torch.equal(seen_keys[0], keys.to(torch.bfloat16))
        seen_keys.clear()
        memory_read(q[:, :1], keys, torch.randn(1, 5, 3), ids, seen[:1], capacity=8, top_k=2, tau=10.0)
        assert seen_keys == [None]
