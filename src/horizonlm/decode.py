"""Fast token-by-token decoding of HorizonLM by replaying a CUDA graph of the one-token step.

Eager decoding launches hundreds of small kernels per token and is bound by the CPU. Between
chunk ends, a step's work depends only on the token and the state, never on the exact position:
the chunk clock stands still, the supervisor state is only read, and the memory is read, not
written. So one graph, captured at the first such step of a chunk, serves every other step of
that chunk; the step that completes a chunk (GRU update, memory write) runs eagerly.

The graph writes its new state over its own input buffers, so this class owns private copies of
the state; :meth:`snapshot` returns an ordinary (immutable-by-contract) state. On the CPU it runs
every step eagerly through the same bookkeeping.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from horizonlm.model import HorizonLM
from horizonlm.state import (
    HorizonState,
    MemoryState,
    StoreMemoryState,
)


def state_tensors(state: HorizonState) -> list[Tensor]:
    """Every tensor of a state, in a fixed order."""
    out: list[Tensor] = []
    for block in state.blocks:
        out.extend(t for t in (block.ssm, block.conv) if t is not None)
    if state.supervisor is not None:
        out.append(state.supervisor.s)
    if isinstance(state.memory, MemoryState):
        out.extend([state.memory.keys, state.memory.values, state.memory.chunk_ids])
    return out


def _advance(state: HorizonState, steps: int) -> HorizonState:
    sup = None if state.supervisor is None else replace(state.supervisor, pos=state.supervisor.pos + steps)
    mem = None if state.memory is None else replace(state.memory, pos=state.memory.pos + steps)
    return replace(state, pos=state.pos + steps, supervisor=sup, memory=mem)


class GraphedDecoder:
    """``step(tokens (B, 1)) -> logits (B, V)``, equal to ``model(tokens, state)`` step by step."""

    def __init__(self, model: HorizonLM, state: HorizonState, bf16: bool = True) -> None:
        if not isinstance(model, HorizonLM):
            raise ValueError("GraphedDecoder needs a HorizonLM (the baseline's cache grows every step)")
        self.model = model
        self.state = state.clone()
        # A store-backed memory is searched on the host side: such states decode eagerly.
        self.use_graphs = model.embed.weight.is_cuda and not isinstance(state.memory, StoreMemoryState)
        self.bf16 = bf16 and self.use_graphs
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_chunk = -1
        self.static_tokens: Tensor | None = None
        self.static_logits: Tensor | None = None

    def _forward(self, tokens: Tensor, state: HorizonState):
        device_type = "cuda" if self.use_graphs else "cpu"
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            return self.model(tokens, state)

    def _capture(self) -> None:
        inputs = self.state.clone()
        self.static_tokens = torch.zeros(self.state.batch_size, 1, dtype=torch.long,
                                         device=self.model.embed.weight.device)  # (B, 1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(self.static_tokens, inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits, outputs = self._forward(self.static_tokens, inputs)
            for dst, src in zip(state_tensors(inputs), state_tensors(outputs)):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
        self.graph, self.static_logits, self.state = graph, logits[:, -1], inputs
        self.graph_chunk = self.state.pos // self.model.config.chunk_size

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per stream (B, 1); returns the next-token logits (B, V)."""
        chunk = self.model.config.chunk_size
        pos = self.state.pos
        ends_chunk = (pos + 1) % chunk == 0
        if not self.use_graphs or ends_chunk:
            logits, self.state = self._forward(tokens, self.state)
            self.graph = None
            return logits[:, -1]
        if self.graph is None or self.graph_chunk != pos // chunk:
            self._capture()
        self.static_tokens.copy_(tokens)
        self.graph.replay()
        self.state = _advance(self.state, 1)
        return self.static_logits.clone()

    def snapshot(self) -> HorizonState:
        """The current state as a fresh, independent HorizonState."""
        return self.state.clone()
