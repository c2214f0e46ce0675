"""The transformer baseline: the same embedding, RMSNorms, GLU MLP, head and ``(logits, state)``
interface as HorizonLM, with causal softmax attention (SDPA) and rotary positions. Its state is
the key/value cache, which grows with the stream: that is the cost HorizonLM avoids."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from horizonlm.config import TransformerConfig
from horizonlm.layers.attention import CausalSelfAttention
from horizonlm.layers.mlp import GLUMLP
from horizonlm.model import check_tokens, init_weights
from horizonlm.state import KVState


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

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
