"""HorizonLM: pre-norm residual blocks of S4D + multi-resolution convolution + GLU MLP, an
induction memory before the first block (or ``memory_layer``) and a recurrent supervisor after the
middle one (DESIGN.md)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from horizonlm.config import HorizonConfig
from horizonlm.layers.count_cache import CountCache
from horizonlm.layers.memory import LateRead, RetrievalMemory
from horizonlm.layers.mlp import GLUMLP
from horizonlm.layers.multires_conv import MultiResConv
from horizonlm.layers.ssm import SSMSublayer
from horizonlm.layers.supervisor import RecurrentSupervisor
from horizonlm.memory.store import MemoryStore, StoreConfig
from horizonlm.state import BlockState, HorizonState, StoreMemoryState


def check_tokens(tokens: Tensor, vocab_size: int) -> None:
    """Reject what would otherwise fail deep inside an embedding lookup."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be a (B, L) integer tensor, got {getattr(tokens, 'shape', type(tokens))}")
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be non-empty, got shape {tuple(tokens.shape)}")
    if tokens.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # reading the values would wait on the device, which a CUDA graph capture forbids
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size:
        raise ValueError(f"token ids must lie in [0, vocab_size={vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")


def init_weights(module: nn.Module, std: float) -> None:
    """Normal(0, std) for linear and embedding weights, zero biases; S4D keeps its own init."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=std)


class HorizonBlock(nn.Module):
    """``h += SSM(norm(h))`` (gated, see :class:`SSMSublayer`), ``h += MultiResConv(norm(h))``,
    ``h += GLU_MLP(norm(h))``."""

    def __init__(self, config: HorizonConfig) -> None:
        super().__init__()
        d = config.d_model
        self.ssm_norm = nn.RMSNorm(d, eps=config.norm_eps) if config.use_ssm else None
        self.ssm = SSMSublayer(config) if config.use_ssm else None
        self.conv_norm = nn.RMSNorm(d, eps=config.norm_eps) if config.use_conv else None
        self.conv = MultiResConv(d, config.conv_kernel, config.conv_levels) if config.use_conv else None
        self.mlp_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.mlp = GLUMLP(d, config.mlp_hidden)

    def init_state(self, batch_size: int, device: torch.device | None = None) -> BlockState:
        return BlockState(
            ssm=None if self.ssm is None else self.ssm.init_state(batch_size, device),
            conv=None if self.conv is None else self.conv.init_state(batch_size, device),
        )

    def forward(self, h: Tensor, state: BlockState | None = None) -> tuple[Tensor, BlockState]:
        if state is None:
            state = self.init_state(h.shape[0], h.device)
        ssm_state, conv_state = state.ssm, state.conv
        if self.ssm is not None:
            y, ssm_state = self.ssm(self.ssm_norm(h), state.ssm)  # (B, L, D)
            h = h + y
        if self.conv is not None:
            y, conv_state = self.conv(self.conv_norm(h), state.conv)  # (B, L, D)
            h = h + y
        h = h + self.mlp(self.mlp_norm(h))  # (B, L, D)
        return h, BlockState(ssm=ssm_state, conv=conv_state)


class HorizonLM(nn.Module):
    """The attention-free language model. ``model(tokens, state) -> (logits, new_state)``.

    Feeding a stream in pieces with the returned state gives the same logits as one call, for
    any split; changing token j never changes logits before j.
    """

    def __init__(self, config: HorizonConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(HorizonBlock(config) for _ in range(config.n_layers))
        self.supervisor = (RecurrentSupervisor(config.d_model, config.supervisor_dim, config.chunk_size, config.norm_eps)
                           if config.use_supervisor else None)
        self.memory = (RetrievalMemory(config.d_model, config.memory_dim, config.chunk_size, config.memory_capacity,
                                       config.memory_topk, config.memory_tau, config.memory_query_block, config.norm_eps,
                                       config.memory_kind, config.memory_key_span, config.has_tau_growth)
                       if config.use_memory else None)
        self.late_read = LateRead(config.d_model, config.norm_eps) if config.has_late_read else None
        self.final_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.count_cache = (CountCache(config.d_model, config.vocab_size, config.count_lengths, config.count_capacity)
                            if config.count_lengths else None)
        init_weights(self, config.init_std)
        if self.late_read is not None:
            nn.init.zeros_(self.late_read.out.weight)  # W_o' = 0: the model starts as without it
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   store_config: StoreConfig | None = None) -> HorizonState:
        """The state at the stream start. With ``store_config``, the memory lives in a
        :class:`MemoryStore` of that backend (batch 1), for memories of millions of entries."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = torch.device(device) if device is not None else self.embed.weight.device
        memory = None
        if self.memory is not None:
            if store_config is None:
                memory = self.memory.init_state(batch_size, device)
            elif batch_size != 1:
                raise ValueError(f"a store-backed memory serves batch_size=1, got {batch_size}")
            else:
                store = MemoryStore(self.config.memory_dim, self.config.memory_dim, store_config, device)
                memory = StoreMemoryState(store=store, entries=0, pos=0, **self.memory.initial_carried(1, device))
        return HorizonState(
            pos=0,
            blocks=tuple(block.init_state(batch_size, device) for block in self.blocks),
            supervisor=None if self.supervisor is None else self.supervisor.init_state(batch_size, device),
            memory=memory,
            batch_size=batch_size,
            counts=None if self.count_cache is None else self.count_cache.init_state(batch_size, device),
        )

    def _check_state(self, state: HorizonState, batch_size: int) -> None:
        if not isinstance(state, HorizonState):
            raise ValueError(f"state must be a HorizonState, got {type(state).__name__}")
        if state.batch_size != batch_size:
            raise ValueError(f"state batch_size={state.batch_size} does not match tokens batch size {batch_size}")
        if len(state.blocks) != len(self.blocks):
            raise ValueError(f"state has {len(state.blocks)} blocks, model has n_layers={len(self.blocks)}")
        if (state.supervisor is None) != (self.supervisor is None) or (state.memory is None) != (self.memory is None):
            raise ValueError("state was made by a model with other use_supervisor/use_memory settings")
        if (state.counts is None) != (self.count_cache is None):
            raise ValueError("state was made by a model with another count_lengths setting")

    def forward(self, tokens: Tensor, state: HorizonState | None = None) -> tuple[Tensor, HorizonState]:
        check_tokens(tokens, self.config.vocab_size)
        batch = tokens.shape[0]
        if state is None:
            state = self.init_state(batch, tokens.device)
        self._check_state(state, batch)
        if self.count_cache is not None:  # the stream's counts, asked before the backbone (CountCache.lookup)
            look, counts = self.count_cache.lookup(tokens, state.counts)
        logits, hidden, new_state = self.backbone(tokens, state)  # (B, L, V), (B, L, D)
        if self.count_cache is not None:  # log-probabilities of the mix with the stream's counts
            logits = self.count_cache.mix(logits, hidden, look)  # (B, L, V)
            new_state = replace(new_state, counts=counts)
        return logits, new_state

    def backbone(self, tokens: Tensor, state: HorizonState) -> tuple[Tensor, Tensor, HorizonState]:
        """Everything but the count cache, on a checked state: the logits (B, L, V), the final normed
        hidden state (B, L, D) the cache mixes from, and the new state with ``state``'s counts as
        they were. The graphed decoder replays this part and runs the cache, whose tables change
        size every step, eagerly."""
        batch, length = tokens.shape
        h = self.embed(tokens.long())  # (B, L, D)
        sup_state, mem_state = state.supervisor, state.memory
        # The induction memory reads before block memory_layer (0: from the token stream alone);
        # the chunk memory reads where the supervisor sits, after it (DESIGN.md part 4).
        induction = self.memory is not None and self.config.memory_kind == "induction"
        block_states = []
        for i in range(len(self.blocks) + 1):
            if induction and i == self.config.memory_layer:
                before = h
                h, mem_state = self.memory(h, state.memory)  # (B, L, D)
                if self.late_read is not None:
                    added = h - before  # (B, L, D): the memory's gated read (zero where reads are dropped)
            if i == self.config.global_at:
                if self.supervisor is not None:
                    h, sup_state = self.supervisor(h, state.supervisor)  # (B, L, D)
                if self.memory is not None and not induction:
                    h, mem_state = self.memory(h, state.memory)  # (B, L, D)
            if i < len(self.blocks):
                h, block_state = self.blocks[i](h, state.blocks[i])  # (B, L, D)
                block_states.append(block_state)
        if self.late_read is not None:
            h = self.late_read(h, added)  # (B, L, D)
        hidden = self.final_norm(h)  # (B, L, D)
        logits = self.head(hidden)  # (B, L, V)
        new_state = HorizonState(pos=state.pos + length, blocks=tuple(block_states), supervisor=sup_state,
                                 memory=mem_state, batch_size=batch, counts=state.counts)
        return logits, hidden, new_state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
