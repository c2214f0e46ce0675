"""``topk_newest_first`` against a plain sort by (score descending, position descending)."""

from __future__ import annotations

import pytest
import torch

from horizonlm.ops.topk_search import topk_newest_first


def _reference(scores: torch.Tensor, k: int, positions: torch.Tensor) -> tuple[list, list]:
    """Per row, the k best under (score desc, position desc), as sets of columns, and their scores."""
    chosen, values = [], []
    for row, pos in zip(scores.tolist(), positions.tolist()):
        order = sorted(range(len(row)), key=lambda c: (row[c], pos[c]), reverse=True)[:k]
        chosen.append(order)
        values.append(sorted((row[c] for c in order), reverse=True))
    return chosen, values


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("given_positions", [False, True])
def test_ties_at_the_kth_place_go_to_the_newest(seed: int, given_positions: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    rows, cols, k = 40, 23, 5
    scores = torch.randint(0, 4, (rows, cols), generator=g).double()  # (R, M): ties everywhere
    scores[torch.rand(rows, cols, generator=g) < 0.5] = float("-inf")  # some rows with fewer than k finite
    positions = (torch.stack([torch.randperm(cols, generator=g) for _ in range(rows)]) if given_positions
                 else torch.arange(cols).expand(rows, cols))  # (R, M)
    top, index = topk_newest_first(scores, k, positions if given_positions else None)
    want_cols, want_values = _reference(scores, k, positions)
    for r in range(rows):
        assert top[r].tolist() == want_values[r]
        assert torch.equal(scores[r, index[r]], top[r])  # the columns hold the scores reported
        finite = [c for c in want_cols[r] if scores[r, c] > float("-inf")]
        if len(finite) == k:  # a full row: exactly the reference's entries
            assert sorted(index[r].tolist()) == sorted(want_cols[r])
        else:  # fewer than k finite: every finite one is chosen, the rest are -inf slots
            assert set(finite) <= set(index[r].tolist())


def test_tie_rule_needs_no_host_sync() -> None:
    """The same answer from a row with and without ties, by the same code path (no branch on data)."""
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])  # (1, 5)
    top, index = topk_newest_first(scores, 2)
    assert top.tolist() == [[3.0, 3.0]] and sorted(index.tolist()[0]) == [2, 4]
    top, index = topk_newest_first(torch.tensor([[1.0, 3.0, 0.0, 2.0]]), 2)
    assert top.tolist() == [[3.0, 2.0]] and index.tolist() == [[1, 3]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_within_rounding_of_the_kth_tie_and_the_newest_wins(dtype: torch.dtype) -> None:
    """A score one float32 ulp above the newest equal one (as a matrix product of another shape can
    round it) does not take the last place from it; a score clearly above (20 ulps) does. The ulps
    are float32's in float64 too, so a float64 reference chooses as the float32 model does."""
    eps = torch.finfo(torch.float32).eps
    for gap, want in ((eps, 2), (20 * eps, 0)):
        scores = torch.tensor([[0.5 + gap, 0.25, 0.5, 0.125]], dtype=dtype)  # (1, 4): column 2 newer than 0
        top, index = topk_newest_first(scores, 1)
        assert index.item() == want and top.item() == scores[0, want].item()
    scores = torch.tensor([[0.5 + eps, 0.9, 0.5, 0.5 - eps]], dtype=dtype)  # (1, 4): 0.9 above, three near ties
    top, index = topk_newest_first(scores, 3)
    assert index.tolist() == [[1, 3, 2]]
