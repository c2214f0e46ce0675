"""The transformer baseline: the same embedding, RMSNorms, GLU MLP, head and ``(logits, state)``
interface as HorizonLM, with causal softmax attention (SDPA) and rotary positions. Its state is
the key/value cache, which grows with the stream: that is the cost HorizonLM avoids.

For decoding it also offers a preallocated :class:`StaticKVCache` (:meth:`TransformerLM.forward_static`),
so its decode step can be graphed the way HorizonLM's is and the two are timed like for like."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from horizonlm.config import TransformerConfig
from horizonlm.layers.attention import CausalSelfAttention
from horizonlm.layers.mlp import GLUMLP
from horizonlm.model import check_tokens, init_weights
from horizonlm.state import KVState


@dataclass(frozen=True)
class StaticKVCache:
    """Preallocated per-layer keys and values, written in place at a position kept on the device.

    Unlike :class:`KVState` it is mutated, so it is owned by one decoder
    (:class:`horizonlm.decode.GraphedTransformerDecoder`), never passed around as a state.
    """

    keys: tuple[Tensor, ...]
    """Per layer, rotated keys; slots at and after ``pos`` are not yet written. (B, H, T, Dh)"""
    values: tuple[Tensor, ...]
    """Per layer, values. (B, H, T, Dh)"""
    pos: Tensor
    """Tokens written so far, the next write slot. () int64, on the cache's device"""

    @property
    def capacity(self) -> int:
        """T: slots per layer."""
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]


class TransformerBlock(nn.Module):
    """``h += Attn(norm(h))``, ``h += GLU_MLP(norm(h))``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config.d_model, config.n_heads, config.rope_base)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = GLUMLP(config.d_model, config.mlp_hidden)

    def forward(self, h: Tensor, cache: tuple[Tensor, Tensor] | None, pos: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        y, cache = self.attn(self.attn_norm(h), cache, pos)  # (B, L, D)
        h = h + y
        return h + self.mlp(self.mlp_norm(h)), cache  # (B, L, D)

    def forward_static(self, h: Tensor, keys: Tensor, values: Tensor, pos: Tensor) -> Tensor:
        """The same block over a static cache layer (see ``CausalSelfAttention.forward_static``)."""
        h = h + self.attn.forward_static(self.attn_norm(h), keys, values, pos)  # (B, L, D)
        return h + self.mlp(self.mlp_norm(h))  # (B, L, D)


class TransformerLM(nn.Module):
    """``model(tokens, state) -> (logits, new_state)`` with ``state`` a :class:`KVState`."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self, config.init_std)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> KVState:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = torch.device(device) if device is not None else self.embed.weight.device
        head_dim = self.config.d_model // self.config.n_heads
        empty = torch.zeros(batch_size, self.config.n_heads, 0, head_dim, device=device,
                            dtype=self.embed.weight.dtype)  # (B, H, 0, Dh)
        n = self.config.n_layers
        return KVState(keys=(empty,) * n, values=(empty,) * n, pos=0, batch_size=batch_size)

    def forward(self, tokens: Tensor, state: KVState | None = None) -> tuple[Tensor, KVState]:
        check_tokens(tokens, self.config.vocab_size)
        batch, length = tokens.shape
        if state is None:
            state = self.init_state(batch, tokens.device)
        if not isinstance(state, KVState):
            raise ValueError(f"state must be a KVState, got {type(state).__name__}")
        if state.batch_size != batch:
            raise ValueError(f"state batch_size={state.batch_size} does not match tokens batch size {batch}")
        h = self.embed(tokens.long())  # (B, L, D)
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            h, (k, v) = block(h, (state.keys[i], state.values[i]), state.pos)  # (B, L, D)
            keys.append(k)
            values.append(v)
        logits = self.head(self.final_norm(h))  # (B, L, V)
        return logits, KVState(keys=tuple(keys), values=tuple(values), pos=state.pos + length, batch_size=batch)

    def static_cache(self, state: KVState, capacity: int, dtype: torch.dtype | None = None) -> StaticKVCache:
        """A :class:`StaticKVCache` of ``capacity`` slots holding a copy of ``state``'s cache."""
        if capacity < state.pos:
            raise ValueError(f"capacity={capacity} cannot hold the {state.pos} cached positions")
        dtype = dtype or self.embed.weight.dtype
        device = self.embed.weight.device
        head_dim = self.config.d_model // self.config.n_heads
        shape = (state.batch_size, self.config.n_heads, capacity, head_dim)
        keys, values = [], []
        for k, v in zip(state.keys, state.values):
            key_buf = torch.zeros(shape, dtype=dtype, device=device)  # (B, H, T, Dh)
            value_buf = torch.zeros(shape, dtype=dtype, device=device)  # (B, H, T, Dh)
            key_buf[:, :, : state.pos] = k
            value_buf[:, :, : state.pos] = v
            keys.append(key_buf)
            values.append(value_buf)
        pos = torch.tensor(state.pos, dtype=torch.long, device=device)  # ()
        return StaticKVCache(keys=tuple(keys), values=tuple(values), pos=pos)

    def forward_static(self, tokens: Tensor, cache: StaticKVCache) -> Tensor:
        """Logits (B, L, V) of ``tokens`` at stream positions ``cache.pos ..``, their keys and
        values written into ``cache`` in place; the caller advances ``cache.pos`` and keeps it
        below the capacity (the position lives on the device, so checking it here would wait
        on the device). Fixed shapes and no host sync (``check_tokens`` reads the token values
        only outside a CUDA graph capture), so a CUDA graph can replay it."""
        check_tokens(tokens, self.config.vocab_size)
        if tokens.shape[0] != cache.batch_size:
            raise ValueError(f"cache batch_size={cache.batch_size} does not match tokens batch size {tokens.shape[0]}")
        h = self.embed(tokens.long())  # (B, L, D)
        for block, keys, values in zip(self.blocks, cache.keys, cache.values):
            h = block.forward_static(h, keys, values, cache.pos)  # (B, L, D)
        return self.head(self.final_norm(h))  # (B, L, V)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
