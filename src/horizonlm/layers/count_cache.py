"""The count cache's output mix: the model's next-token distribution blended with what followed
the token's context earlier in the stream (:mod:`horizonlm.ops.count_cache`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from horizonlm.ops.count_cache import CountLookup, count_cache_call, empty_tables
from horizonlm.state import CountCacheState


class CountCache(nn.Module):
    """``p_t(v) = (1 - lam_t) softmax(z_t)_v + lam_t c_t(v) / T_t`` where c_t, T_t are the counts of
    the longest context length that occurred before (the cache's chosen one) and
    ``lam_t = sigmoid(w . [norm(h_t), f_t] + b)``, with f_t the chosen length (one-hot), log(1 + T)
    of every length and of the chosen one, and the chosen counts' largest share. Where no length
    occurred, ``p_t = softmax(z_t)``: an empty cache is the model without it.

    Why: the induction memory reads a few of a context's entries (top K); a book's own phrasing
    recurs hundreds of times, which exact counts pool without limit of distance
    (``horizon bench headroom``: 0.08 bits/byte over the whole book at CPU scale, RESULTS.md 1.2d).
    The counts carry no gradient; lam learns from every token how far to trust them.
    Returns log-probabilities (float32 at least), which every consumer of logits takes as they are.
    """

    def __init__(self, d_model: int, vocab: int, lengths: tuple[int, ...], capacity: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.lengths = tuple(lengths)
        self.capacity = capacity
        self.gate = nn.Linear(d_model + 2 * len(self.lengths) + 2, 1)

    def init_state(self, batch_size: int, device: torch.device | None = None) -> CountCacheState:
        tail = torch.full((batch_size, max(self.lengths)), -1, dtype=torch.int64, device=device)  # (B, n)
        return CountCacheState(empty_tables(batch_size, device), tail=tail, pos=0)

    def features(self, look: CountLookup) -> Tensor:
        """f_t: which length was chosen, how much of each was seen, how peaked the chosen counts are. (B, L, F)"""
        n_len = len(self.lengths)
        chosen = F.one_hot(look.chosen.clamp(min=0), n_len) * (look.chosen >= 0).unsqueeze(-1)  # (B, L, n)
        seen = torch.log1p(look.totals.float())  # (B, L, n)
        total = look.counts.sum(-1, keepdim=True)  # (B, L, 1)
        peak = look.counts.amax(-1, keepdim=True) / total.clamp(min=1)  # (B, L, 1)
        return torch.cat([chosen.float(), seen, torch.log1p(total.float()), peak.float()], dim=-1)  # (B, L, F)

    def mix(self, logits: Tensor, hidden: Tensor, look: CountLookup) -> Tensor:
        """log p_t for every token, in float32 (float64 for a float64 model). (B, L, V)"""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        features = torch.cat([hidden.to(dtype), self.features(look).to(dtype)], dim=-1)  # (B, L, D + F)
        g = self.gate(features.to(self.gate.weight.dtype)).to(dtype)  # (B, L, 1)
        model_lp = F.log_softmax(logits.to(dtype), dim=-1)  # (B, L, V)
        total = look.counts.sum(-1, keepdim=True).clamp(min=1)  # (B, L, 1)
        cache_lp = torch.log(look.counts.to(dtype) / total)  # (B, L, V): -inf where never seen
        mixed = torch.logaddexp(F.logsigmoid(-g) + model_lp, F.logsigmoid(g) + cache_lp)  # (B, L, V)
        return torch.where((look.chosen >= 0).unsqueeze(-1), mixed, model_lp)  # (B, L, V)

    def lookup(self, tokens: Tensor, state: CountCacheState | None = None) -> tuple[CountLookup, CountCacheState]:
        """The counts for every token of ``tokens`` (B, L) and the state after them. They depend on
        the tokens alone, so the model asks before its backbone: the lookup's few host syncs then
        wait on the lookup's own kernels, not on the whole forward pass queued before them."""
        if state is None:
            state = self.init_state(tokens.shape[0], tokens.device)
        look, tables, tail = count_cache_call(state.tables, state.tail, state.pos, tokens.long(), self.lengths, self.vocab,
                                              self.capacity)
        return look, CountCacheState(tables, tail=tail, pos=state.pos + tokens.shape[1])

    def forward(self, logits: Tensor, hidden: Tensor, tokens: Tensor, state: CountCacheState | None = None
                ) -> tuple[Tensor, CountCacheState]:
        """logits (B, L, V) and the final normed hidden state (B, L, D) of the tokens (B, L)."""
        look, new_state = self.lookup(tokens, state)
        return self.mix(logits, hidden, look), new_state
