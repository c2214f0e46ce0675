"""The retrieval hit rate of ``horizon bench recall``: for every query, did the memory's top-K
read contain the entry of the chunk that holds the answer? Kept apart from accuracy: a model that
finds the chunk but cannot decode it and one that never finds it need different fixes.

The memory layer is left untouched: a forward hook on ``model.memory`` sees the layer's input
and state, rebuilds the entries and queries the way the layer does, and asks
:func:`horizonlm.ops.memory_read.memory_topk_ids` (the read's own selection) which chunks each
token read. The rebuilt keys are compared with the keys the layer returns in its state, so a
change to the layer that the probe does not follow is an error, not a wrong number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from horizonlm.errors import HorizonError
from horizonlm.ops.memory_read import count_tau, memory_topk_ids, read_weights
from horizonlm.ops.topk_read import visible_counts
from horizonlm.state import MemoryState


class MemoryProbe:
    """Records, for the query positions of one batch, the chunk ids the memory's top-K read
    selected and, where every token writes an entry (the induction memory), the stream positions
    of the entries' tokens. Use as a context manager around the batch's forward passes."""

    def __init__(self, memory: nn.Module, query_pos: Tensor) -> None:
        self.memory = memory
        self.query_pos = query_pos  # (B, P)
        batch, queries = query_pos.shape
        self.selected = torch.full((batch, queries, memory.top_k), -1, dtype=torch.long,
                                   device=query_pos.device)  # (B, P, K)
        self.selected_pos = self.selected.clone()  # (B, P, K)
        self.selected_weight = torch.zeros(batch, queries, memory.top_k, device=query_pos.device)  # (B, P, K)
        self._handle = None

    def __enter__(self) -> MemoryProbe:
        self._handle = self.memory.register_forward_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    @torch.no_grad()
    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        """Top-K chunk ids of the queries that fall in this call."""
        h = args[0] if args else kwargs["h"]
        state = args[1] if len(args) > 1 else kwargs.get("state")
        state = state if state is not None else module.init_state(h.shape[0], h.device)
        if not isinstance(state, MemoryState):
            raise HorizonError("the hit-rate probe reads the in-state memory, not a store-backed one")
        length = h.shape[1]
        local = self.query_pos - state.pos  # (B, P)
        inside = (local >= 0) & (local < length)  # (B, P)
        if not bool(inside.any()):
            return
        p = module.project(h, state.pos, state.last_key, state.tail)
        keys = torch.cat([state.keys.to(p.keys.dtype), p.keys], dim=1)  # (B, M+m, Dk)
        ids = torch.cat([state.chunk_ids, p.ids])  # (M+m,)
        _check_rebuilt(keys, ids, output[1])
        per_token = module.entries_per_chunk > 1  # one entry per token, stored in stream order up to pos + L
        first = state.pos + length - ids.numel()  # stream position of the oldest entry
        positions = torch.arange(first, state.pos + length, device=ids.device) if per_token else None  # (M+m,)
        picked = memory_topk_ids(p.queries, keys, ids, p.layout.completed_before, module.capacity, module.top_k,
                                 module.query_block, positions)  # (B, L, K): positions, or chunk ids
        if picked.shape[-1] < module.top_k:
            picked = F.pad(picked, (0, module.top_k - picked.shape[-1]), value=-1)  # (B, L, K)
        at = local.clamp(0, length - 1).unsqueeze(-1).expand(-1, -1, module.top_k)  # (B, P, K)
        picked = picked.gather(1, at)  # (B, P, K)
        keep = inside.unsqueeze(-1)  # (B, P, 1)
        if per_token:  # the one search gives both: each picked entry's position, and its chunk tag
            self.selected_pos = torch.where(keep, picked, self.selected_pos)  # (B, P, K)
            weights = self._read_weights(module, p.queries, keys, local.clamp(0, length - 1), picked, first,
                                         ids, p.layout.completed_before, state.live_from)  # (B, P, K)
            self.selected_weight = torch.where(keep, weights, self.selected_weight)  # (B, P, K)
            picked = torch.where(picked >= 0, ids[(picked - first).clamp(min=0)], -1)  # (B, P, K)
        self.selected = torch.where(keep, picked, self.selected)  # (B, P, K)

    @staticmethod
    def _read_weights(module: nn.Module, queries: Tensor, keys: Tensor, at: Tensor, picked: Tensor,
                      first: int, ids: Tensor, completed_before: Tensor, live_from: Tensor | None) -> Tensor:
        """The softmax weight the read gave each picked entry (:func:`read_weights`, the null entry
        included, at the tau the read used: grown with the entries seen where the memory grows it),
        at the query positions ``at`` (B, P); ``picked`` holds stream positions (B, P, K), -1 where
        fewer than K were visible, ``first`` the stream position of ``keys``' first row; ``ids``
        (M,) the entries' chunk ids, ``completed_before`` (L,) the call's chunk clock."""
        q = queries.gather(1, at.unsqueeze(-1).expand(-1, -1, queries.shape[-1]))  # (B, P, Dk)
        rows = torch.arange(keys.shape[0], device=keys.device).view(-1, 1, 1)  # (B, 1, 1)
        k = keys[rows, (picked - first).clamp(min=0)]  # (B, P, K, Dk)
        scores = torch.einsum("bpd,bpkd->bpk", q.float(), k.float())  # (B, P, K)
        scores = scores.masked_fill(picked < 0, float("-inf"))  # (B, P, K)
        growth = module.tau_growth  # the entries each query saw, counted as memory_read counts them
        counts = None if growth is None else visible_counts(ids, completed_before[at], module.capacity, live_from)
        tau = count_tau(module.tau, None if growth is None else growth.float(), counts)  # tau or (B, P, 1)
        return read_weights(scores, tau, module.null_score)  # (B, P, K)

    def outcome(self, answer_pos: Tensor) -> dict[str, Tensor]:
        """Per query (B, P): ``applicable`` (the answer's chunk completed before the query, so the
        memory could hold it), ``hit`` (its entry among the top-K read), ``hit_entry`` (token and
        the induction memory: the entry written at the answer token itself among them), ``evicted`` (completed,
        but older than the memory's capacity), ``chance`` (the hit rate of a read of K entries
        drawn at random from the visible ones: with E entries per chunk, 1 - prod_i (N-E-i)/(N-i)
        over i < K, N = E x visible chunks; K/N when E = 1)."""
        chunk = self.memory.chunk_size
        answer_chunk = answer_pos // chunk  # (B, P)
        seen = self.query_pos // chunk  # (B, P): chunks completed before the query
        per_chunk = self.memory.entries_per_chunk
        entries = (seen.clamp(max=self.memory.capacity) * per_chunk).double()  # (B, P): N
        miss = torch.ones_like(entries)  # (B, P): no pick lands in the answer's chunk
        for i in range(self.memory.top_k):
            miss = miss * ((entries - per_chunk - i).clamp(min=0) / (entries - i).clamp(min=1))  # (B, P)
        return {
            "applicable": answer_chunk < seen,  # (B, P)
            "hit": (self.selected == answer_chunk.unsqueeze(-1)).any(-1),  # (B, P)
            "hit_entry": (self.selected_pos == answer_pos.unsqueeze(-1)).any(-1),  # (B, P); False in chunk mode
            # the read's softmax weight on the answer's own entry (0 where not picked; chunk mode: 0)
            "entry_weight": (self.selected_weight * (self.selected_pos == answer_pos.unsqueeze(-1))).sum(-1),  # (B, P)
            "evicted": answer_chunk < seen - self.memory.capacity,  # (B, P)
            "chance": ((1 - miss) * (entries > 0)).float(),  # (B, P)
        }


def _check_rebuilt(keys: Tensor, ids: Tensor, new_state: object) -> None:
    """The keys the probe rebuilt must be the ones the layer kept in its returned state."""
    if not isinstance(new_state, MemoryState):
        raise HorizonError("the memory layer returned an unexpected state; update bench/recall_probe.py")
    kept = new_state.keys.shape[1]
    same = (kept <= keys.shape[1] and torch.equal(new_state.chunk_ids, ids[ids.numel() - kept:])
            and torch.allclose(new_state.keys.float(), keys[:, keys.shape[1] - kept:].float(), atol=1e-3, rtol=1e-2))
    if not same:
        raise HorizonError("the hit-rate probe no longer rebuilds the memory's entries as layers/memory.py makes "
                           "them; update bench/recall_probe.py to follow the layer")
