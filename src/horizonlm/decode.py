"""Fast token-by-token decoding by replaying a CUDA graph of the one-token step, for HorizonLM
and for the transformer baseline, so that decode latencies compare graph against graph.

Each decoder is two parts kept apart:

- the bookkeeping, in the decoder classes: which steps replay and which run eagerly, when to
  capture, the stream position, and the state buffers that a step reads and overwrites;
- the capture, in :func:`replayable`: it turns a step over those buffers into a replay. On a
  GPU that is a CUDA graph; elsewhere the replay is the step function itself, run over the same
  buffers with the same values frozen at capture time (the stream position a graph bakes in),
  so a CPU test exercises exactly the bookkeeping the graph path uses.

HorizonLM: between chunk ends, a step's work depends only on the token and the state, never on
the exact position: the chunk clock stands still, the supervisor state is only read, and the
memory is read, not written. So one replay, captured at the first such step of a chunk, serves
every other step of that chunk; the step that completes a chunk (GRU update, memory write) runs
eagerly (its work depends on the chunk's index and the memory grows by one entry). Once the
memory is full its size stops changing, and a step depends on the stream position only through
which entries it sees (their chunk ids against its own chunk, baked in at capture): the decoder
then copies each new chunk's state into the same buffers with the chunk ids moved back into the
capture's frame, and one replay serves every later chunk (``GraphedDecoder._rebase``); the
chunk-end step then replays too, from a second graph. A memory still filling is padded to its
full size with entries no token sees, in a frame moved on to a full memory (``_full_frame``), so
the same holds from the first chunk. The induction
memory (``memory_kind="induction"``) writes an entry every step, but that entry stays invisible
until its chunk completes, so what a step reads is still constant inside a chunk: the replay reads
a memory padded with one empty slot (tagged with the current chunk, so invisible) per step left
in the chunk, and each step writes its entry into the next slot, at an index held on the device.

The count cache (``count_lengths``) keeps tables that grow and change size with every token, so
no graph holds them: the decoder replays the model's step without the cache
(:meth:`horizonlm.model.HorizonLM.backbone`, its logits and final hidden state side by side) as it
would without one, and the cache mixes each step's output eagerly, its state kept on the host
beside the replay's buffers (:class:`horizonlm.decode_counts.HostCounts`).

Transformer: its step writes into a :class:`horizonlm.baseline.StaticKVCache` at a position held
on the device, so a single replay serves every step up to the cache's capacity.

The decoders own private copies of the state; ``snapshot`` returns an ordinary state.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import torch
from torch import Tensor, nn

from horizonlm.baseline import TransformerLM
from horizonlm.decode_counts import HostCounts
from horizonlm.model import HorizonLM
from horizonlm.ops.count_cache import CountLookup
from horizonlm.state import HorizonState, KVState, MemoryState, StoreMemoryState

M = TypeVar("M", bound=nn.Module)

CAPTURE_WARMUP = 2
"""Eager, state-preserving runs of a step before its CUDA graph is captured (lazy
initialisation of kernels and workspaces must not happen during capture)."""


def state_tensors(state: HorizonState) -> list[Tensor]:
    """Every tensor of a state, in a fixed order."""
    out: list[Tensor] = []
    for block in state.blocks:
        out.extend(t for t in (block.ssm, block.conv) if t is not None)
    if state.supervisor is not None:
        out.append(state.supervisor.s)
    if isinstance(state.memory, MemoryState):
        out.extend([state.memory.keys, state.memory.values, state.memory.chunk_ids])
        out.extend(t for t in (state.memory.last_key, state.memory.tail) if t is not None)
    return out


def bf16_linears(model: M) -> M:
    """A copy of ``model`` whose Linear weights and biases are bf16, cast once, for decoding under
    autocast.

    Under autocast a step casts each Linear's weight and bias itself, one kernel each, every step:
    the decoders turn autocast's cast cache off, since a cached cast is freed when the autocast
    region ends while a captured graph would still read it. Autocast leaves a tensor already in
    its dtype as it is, so a step of the copy under autocast computes exactly what a step of
    ``model`` does. Every other parameter stays as it is; a weight the head ties to the embedding
    is untied in the copy (only the Linear's use is cast). The copy holds the Linear weights in
    half their bytes beside the original model."""
    shadow = copy.deepcopy(model)
    for module in shadow.modules():
        if isinstance(module, nn.Linear):
            for name, param in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False))
    return shadow


def replayable(step: Callable[[bool], Tensor], use_graph: bool) -> Callable[[], Tensor]:
    """A replay of ``step(commit=True)``.

    ``step(commit)`` computes one decode step from static buffers only and returns its logits;
    with ``commit`` it also writes the new state into those buffers, without it leaves the state
    as it was (a warm-up). With ``use_graph`` the step is warmed up on a side stream and captured
    in a CUDA graph: each replay reruns the captured kernels, with every Python value (shapes,
    positions) as it was at capture, and returns the same output tensor, overwritten. Without,
    the same warm-ups run (so a CPU test also checks that they leave the state alone) and the
    replay calls ``step(True)`` itself, over the same buffers and frozen values.
    """
    if not use_graph:
        for _ in range(CAPTURE_WARMUP):
            step(False)
        return lambda: step(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(CAPTURE_WARMUP):
            step(False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(True)

    def replay() -> Tensor:
        graph.replay()
        return out

    return replay


def _check_step_tokens(tokens: Tensor, batch_size: int) -> None:
    """Shape and dtype, read on the host. Token values are not read (that would wait on the
    device every step); a replayed step assumes ids in [0, V), as sampled from its logits."""
    if not isinstance(tokens, Tensor) or tuple(tokens.shape) != (batch_size, 1) or tokens.is_floating_point():
        got = getattr(tokens, "shape", type(tokens))
        raise ValueError(f"step needs integer tokens of shape ({batch_size}, 1), got {got}")


def _advance(state: HorizonState, steps: int) -> HorizonState:
    """The positions of ``state`` moved on by ``steps`` tokens (the tensors are left as they are)."""
    sup = None if state.supervisor is None else replace(state.supervisor, pos=state.supervisor.pos + steps)
    mem = None if state.memory is None else replace(state.memory, pos=state.memory.pos + steps)
    return replace(state, pos=state.pos + steps, supervisor=sup, memory=mem)


def _blank_entries(memory: MemoryState, count: int, chunk_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """``count`` entries of zero key and value, tagged ``chunk_id``: keys (B, n, Dk), values
    (B, n, Dv), chunk ids (n,)."""
    batch = memory.keys.shape[0]
    return (memory.keys.new_zeros(batch, count, memory.keys.shape[2]),  # (B, n, Dk)
            memory.values.new_zeros(batch, count, memory.values.shape[2]),  # (B, n, Dv)
            memory.chunk_ids.new_full((count,), chunk_id))  # (n,)


def _padded(memory: MemoryState, chunk_size: int) -> MemoryState:
    """``memory`` with an empty slot for each entry the rest of its chunk writes, tagged with the
    current chunk (``pos // C``): no token of this chunk sees them, and the chunk ids stay in
    stream order, as the read requires."""
    keys, values, ids = _blank_entries(memory, chunk_size - memory.pos % chunk_size, memory.pos // chunk_size)
    return replace(memory, keys=torch.cat([memory.keys, keys], 1), values=torch.cat([memory.values, values], 1),
                   chunk_ids=torch.cat([memory.chunk_ids, ids]))  # M+f entries


UNSEEN_CHUNK = -(2**40)
"""The chunk id of a filler entry: below every real chunk id (so entries stay in stream order) and
seen by no token, whatever the frame's shift."""


def _frame_lead(pos: int, capacity: int, chunk_size: int) -> int:
    """Chunks a frame whose memory counts as full is ahead of stream position ``pos``: the chunks
    a memory of ``capacity`` chunks has not yet written (0 once it is full)."""
    return max(0, capacity - pos // chunk_size)


def _full_frame(state: HorizonState, capacity: int, per_chunk: int, chunk_size: int) -> HorizonState:
    """``state`` moved into a frame where its memory is full: its positions moved on by
    :func:`_frame_lead` chunks, its chunk ids moved on with them, and filler entries (zero keys
    and values, chunk id :data:`UNSEEN_CHUNK`), ``per_chunk`` a chunk not yet written, in front.
    Every token then sees the entries it sees in the real stream, and an eviction drops fillers
    first, so a step's work in the frame is its work in the stream while the entries keep the
    full memory's count."""
    memory = state.memory
    moved = _frame_lead(state.pos, capacity, chunk_size)
    keys, values, ids = _blank_entries(memory, moved * per_chunk, UNSEEN_CHUNK)
    memory = replace(memory, keys=torch.cat([keys, memory.keys], 1), values=torch.cat([values, memory.values], 1),
                     chunk_ids=torch.cat([ids, memory.chunk_ids + moved]))  # F+M entries
    return _advance(replace(state, memory=memory), moved * chunk_size)


class GraphedDecoder:
    """``step(tokens (B, 1)) -> logits (B, V)``, equal to ``model(tokens, state)`` step by step.

    Steps inside a chunk replay (a CUDA graph on a GPU), with either memory, and so do chunk-end
    steps once one replay serves every chunk; states whose memory lives in a store (searched on
    the host side) run the model eagerly.
    The model's weights are fixed while it decodes: the SSM cores and the convolutions keep
    their parameter-only work between steps (``layers.derived.Derived``), the Linear weights are
    cast once for bf16 (:func:`bf16_linears`), and a captured graph reads what they kept.

    While the memory fills, its chunks would change the replay's shapes: a memory of at most
    ``fill_frame_entries`` entries (capacity x entries a chunk) is instead padded to its full size
    at the first capture, with filler entries no token sees, in a frame whose stream position is
    moved on so that the memory counts as full (:func:`_full_frame`); one replay then serves every
    chunk from the start. A larger memory (the whole 1M-token memory of a passkey run, say) is not
    preallocated: a replay is captured per chunk until it is full.

    ``bf16``: autocast to bf16 (None: on a GPU only; True on a CPU too).
    ``graph_chunk_ends``: once one replay serves every chunk, replay the chunk-end step too (a
    second graph, captured once: the supervisor's update, the memory's eviction and the frame's
    shift inside it), so no step runs eagerly: on the H200 equal to eager decoding and 1.95 ms a
    token over whole chunks at 64K and 1M of context against 2.16 with eager chunk ends
    (RESULTS.md 3.2); CPU tests hold it to the model step by step.
    """

    def __init__(self, model: HorizonLM, state: HorizonState, bf16: bool | None = None,
                 graph_chunk_ends: bool = True, fill_frame_entries: int = 65536) -> None:
        if not isinstance(model, HorizonLM):
            raise ValueError("GraphedDecoder needs a HorizonLM (GraphedTransformerDecoder serves the baseline)")
        self.model = model
        # the count cache's tables change size every step: they stay outside the replayed buffers,
        # on the host (:class:`HostCounts`: a token's lookup there is a few dictionary lookups, where
        # the batched path launches a few hundred small operations), and the cache mixes each step's
        # replayed logits eagerly (:meth:`_output`)
        cache = model.count_cache
        self.counts = (None if state.counts is None
                       else HostCounts(state.counts, cache.lengths, cache.vocab, cache.capacity))
        self.state = replace(state, counts=None).clone()
        self.use_graphs = model.embed.weight.is_cuda
        self.token_writes = model.memory is not None and model.memory.kind == "induction"
        self.replays = not isinstance(state.memory, StoreMemoryState)  # a store grows in place
        self.bf16 = self.use_graphs if bf16 is None else bf16
        self.runner = bf16_linears(model) if self.bf16 else model  # what each step calls
        self.replay: Callable[[], Tensor] | None = None
        self.static_tokens: Tensor | None = None
        self.filled: int | None = None  # induction, while replaying: real entries at the front of the padded memory
        self.slot: Tensor | None = None  # the same count on the device: where the next entry is written
        self.captured_filled: int | None = None  # induction: real entries when the replay was captured
        self.frame = 0  # the chunk the replay was captured in: its baked stream position's chunk
        self.shift = 0  # chunks from the replay's frame to the real stream (buffers hold chunk ids - shift)
        self.captures = 0  # replays made: one per chunk with a replayed step, until the memory is full
        self.eager_steps = 0  # chunk ends, or every step of a store-backed state
        self.graph_chunk_ends = graph_chunk_ends
        self.end_replay: Callable[[], Tensor] | None = None  # the chunk-end step's replay, once captured
        self.end_captures = 0
        if fill_frame_entries < 0:
            raise ValueError(f"fill_frame_entries must be >= 0, got {fill_frame_entries}")
        self.fill_frame_entries = fill_frame_entries
        self.frame_filled = False  # the replay's memory was padded to full size at capture (_full_frame)

    def _autocast(self) -> torch.autocast:
        device_type = "cuda" if self.use_graphs else "cpu"
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False)

    def _forward(self, tokens: Tensor, state: HorizonState) -> tuple[Tensor, HorizonState]:
        """The model's step without the count cache: its logits (B, L, V), with the final hidden
        state beside them (B, L, V + D) when the cache will mix them, and its new state."""
        with torch.no_grad(), self._autocast():
            logits, hidden, new = self.runner.backbone(tokens, state)  # (B, L, V), (B, L, D)
        if self.counts is None:
            return logits, new
        dtype = torch.promote_types(torch.promote_types(logits.dtype, hidden.dtype), torch.float32)
        return torch.cat([logits.to(dtype), hidden.to(dtype)], dim=-1), new  # (B, L, V + D)

    def _output(self, tokens: Tensor, out: Tensor, replayed: bool) -> Tensor:
        """A step's next-token logits (B, V) from the backbone's ``out`` (B, V) or (B, V + D): a
        replay's buffer is copied (the next replay overwrites it); with the count cache, its mix
        (log-probabilities, as the model returns them), the cache's state moved on by the step."""
        if self.counts is None:
            return out.clone() if replayed else out
        vocab = self.model.config.vocab_size
        look = CountLookup(*(t.to(out.device) for t in self.counts.step(tokens.reshape(-1).tolist())))  # on the host
        with torch.no_grad(), self._autocast():
            mixed = self.runner.count_cache.mix(out[:, None, :vocab], out[:, None, vocab:], look)  # (B, 1, V)
        return mixed[:, -1]

    def _fills_frame(self, state: HorizonState) -> bool:
        """Whether a capture from ``state`` pads its memory to full size (:func:`_full_frame`)."""
        memory = self.model.memory
        return (isinstance(state.memory, MemoryState) and state.pos // self.model.config.chunk_size < memory.capacity
                and memory.capacity * memory.entries_per_chunk <= self.fill_frame_entries)

    def _fillers_at(self, pos: int) -> int:
        """Filler entries at the front of the replay's memory at stream position ``pos``: a
        padded frame's chunks not yet written (each chunk end evicts one chunk of them)."""
        if not self.frame_filled:
            return 0
        memory = self.model.memory
        return _frame_lead(pos, memory.capacity, self.model.config.chunk_size) * memory.entries_per_chunk

    @property
    def fillers(self) -> int:
        """Filler entries at the front of the replay's memory now."""
        return self._fillers_at(self.state.pos)

    def _capture(self) -> None:
        """A replay of one in-chunk step over fresh buffers, which become the decoder's state."""
        inputs, chunk = self.state.clone(), self.model.config.chunk_size
        real_pos = inputs.pos
        self.frame_filled = self._fills_frame(inputs)
        if self.frame_filled:
            memory = self.model.memory
            inputs = _full_frame(inputs, memory.capacity, memory.entries_per_chunk, chunk)
        device = self.model.embed.weight.device
        tokens = torch.zeros(inputs.batch_size, 1, dtype=torch.long, device=device)  # (B, 1)
        if self.token_writes:
            self.filled = self.captured_filled = inputs.memory.keys.shape[1]
            self.slot = torch.tensor([self.filled], device=device)  # (1,)
            inputs = replace(inputs, memory=_padded(inputs.memory, chunk))
        self.frame = inputs.pos // chunk
        self.shift = real_pos // chunk - self.frame

        def step(commit: bool) -> Tensor:
            logits, outputs = self._forward(tokens, inputs)  # (B, 1, V)
            if commit:
                self._commit(inputs, outputs)
            return logits[:, -1]  # (B, V)

        self.replay = replayable(step, self.use_graphs)
        self.static_tokens, self.state = tokens, _advance(inputs, real_pos - inputs.pos)  # positions: the stream's
        self.captures += 1

    def _commit(self, inputs: HorizonState, outputs: HorizonState) -> None:
        """Write a step's new state into the buffers it read. The induction memory's new entry
        (the last of ``outputs``' entries) goes into the slot at ``self.slot``; the rest of its
        output (the padded entries, sliced at a length frozen at capture) is not copied."""
        writes = self.token_writes
        for dst, src in zip(state_tensors(replace(inputs, memory=None) if writes else inputs),
                            state_tensors(replace(outputs, memory=None) if writes else outputs)):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        if writes:
            old, new = inputs.memory, outputs.memory
            old.keys.index_copy_(1, self.slot, new.keys[:, -1:].to(old.keys.dtype))
            old.values.index_copy_(1, self.slot, new.values[:, -1:].to(old.values.dtype))
            old.last_key.copy_(new.last_key)
            if old.tail is not None:
                old.tail.copy_(new.tail)
            self.slot.add_(1)

    def _full(self) -> bool:
        """Whether the replay serves every later chunk: captured with the memory full (and, for
        the induction memory, at a chunk start), so no chunk end changes a buffer's shape."""
        if self.replay is None:
            return False
        memory, chunk = self.state.memory, self.model.config.chunk_size
        if memory is None:
            return True
        capacity = self.model.memory.capacity
        if self.token_writes:
            return self.captured_filled == capacity * chunk and memory.keys.shape[1] - self.captured_filled == chunk
        return memory.keys.shape[1] == capacity

    def _capture_chunk_end(self) -> None:
        """A replay of the chunk-end step over the in-chunk replay's buffers, in its frame: the
        real entries are a view of the padded memory's front (the last slot is this step's own
        entry), and the commit writes the new state back, its chunk ids moved back by the one
        chunk just completed, so the in-chunk replay serves the next chunk as it is."""
        chunk, buffers = self.model.config.chunk_size, self.state
        end = self.frame * chunk + chunk - 1  # the chunk end's position in the frame
        memory = buffers.memory
        if memory is not None:
            real = memory.keys.shape[1] - 1 if self.token_writes else memory.keys.shape[1]
            memory = replace(memory, keys=memory.keys[:, :real], values=memory.values[:, :real],
                             chunk_ids=memory.chunk_ids[:real])
        inputs = _advance(replace(buffers, memory=memory), end - buffers.pos)
        tokens = self.static_tokens

        def step(commit: bool) -> Tensor:
            logits, outputs = self._forward(tokens, inputs)  # (B, 1, V)
            if commit:  # the fillers left are among the outputs' entries, evicted first
                self._load(buffers, outputs, 1, 0)
            return logits[:, -1]  # (B, V)

        self.end_replay = replayable(step, self.use_graphs)
        self.end_captures += 1

    def _rebase(self, new: HorizonState) -> bool:
        """After an eager chunk end, keep the replay for the chunk ``new`` starts if it serves every
        chunk (:meth:`_full`: then no state tensor of ``new`` changed shape): ``new`` is copied into
        the replay's buffers with its chunk ids moved back by the chunks since the capture. A step's work depends on the stream position only through
        which entries it sees (chunk ids against its own chunk, baked at capture), so in that frame
        it computes what it computes in the real one. Returns whether the replay was kept."""
        if not self._full():
            return False
        self.shift = new.pos // self.model.config.chunk_size - self.frame
        self._load(self.state, new, self.shift, self._fillers_at(new.pos))
        if self.token_writes:
            self.filled = self.captured_filled
        self.state = _advance(self.state, new.pos - self.state.pos)
        return True

    def _load(self, buffers: HorizonState, new: HorizonState, shift: int, fillers: int) -> None:
        """Copy ``new`` into the replay's ``buffers``: the blocks' and the supervisor's tensors, and
        the memory's entries after ``fillers`` filler entries (none once the memory is full), their
        chunk ids less ``shift`` (into the replay's frame); for the induction memory the next
        entry's slot back at the padding's front (the padding's old entries are tagged with the
        replay's own chunk: invisible). It runs inside the chunk-end replay too, so it reads and
        sets no decoder attribute that changes between steps."""
        for dst, src in zip(state_tensors(replace(buffers, memory=None)), state_tensors(replace(new, memory=None))):
            dst.copy_(src)
        if buffers.memory is None:
            return
        memory, fresh = buffers.memory, new.memory
        end = fillers + fresh.keys.shape[1]
        memory.keys[:, fillers:end].copy_(fresh.keys)
        memory.values[:, fillers:end].copy_(fresh.values)
        memory.chunk_ids[:fillers].fill_(UNSEEN_CHUNK)
        memory.chunk_ids[fillers:end].copy_(fresh.chunk_ids - shift)
        for name in ("last_key", "tail"):
            if getattr(memory, name) is not None:
                getattr(memory, name).copy_(getattr(fresh, name))
        if self.token_writes:
            self.slot.fill_(end)

    def _real_state(self) -> HorizonState:
        """The decoder's state in the real stream: without the padding of an induction memory's
        replay, its chunk ids moved from the replay's frame to the stream's."""
        memory = self.state.memory
        if memory is None or isinstance(memory, StoreMemoryState) or (self.filled is None and not self.shift):
            return self.state
        if self.filled is not None or self.fillers:
            real = slice(self.fillers, self.filled)
            memory = replace(memory, keys=memory.keys[:, real], values=memory.values[:, real],
                             chunk_ids=memory.chunk_ids[real])
        if self.shift:
            memory = replace(memory, chunk_ids=memory.chunk_ids + self.shift)  # (M,)
        return replace(self.state, memory=memory)

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per stream (B, 1); returns the next-token logits (B, V)."""
        _check_step_tokens(tokens, self.state.batch_size)
        ends_chunk = (self.state.pos + 1) % self.model.config.chunk_size == 0
        if ends_chunk and self.graph_chunk_ends and self._full():
            if self.end_replay is None:
                self._capture_chunk_end()
            self.static_tokens.copy_(tokens)
            logits = self.end_replay()  # (B, V)
            self.state = _advance(self.state, 1)
            self.shift += 1
            if self.filled is not None:
                self.filled = self.captured_filled
            return self._output(tokens, logits, replayed=True)
        if not self.replays or ends_chunk:
            logits, new = self._forward(tokens, self._real_state())  # (B, 1, V)
            self.eager_steps += 1
            if not self._rebase(new):  # the next chunk's state does not fit the replay: a new capture
                self.state, self.replay, self.filled, self.slot, self.shift = new, None, None, None, 0
                self.frame_filled = False
            return self._output(tokens, logits[:, -1], replayed=False)
        if self.replay is None:
            self._capture()
        self.static_tokens.copy_(tokens)
        logits = self.replay()  # (B, V)
        self.state = _advance(self.state, 1)
        if self.filled is not None:
            self.filled += 1
        return self._output(tokens, logits, replayed=True)

    def snapshot(self) -> HorizonState:
        """The current state as a fresh, independent HorizonState."""
        counts = None if self.counts is None else self.counts.state(self.model.embed.weight.device)
        return replace(self._real_state(), counts=counts).clone()


class GraphedTransformerDecoder:
    """``step(tokens (B, 1)) -> logits (B, V)``, equal to ``model(tokens, state)`` step by step,
    over a static KV cache of at least ``capacity`` slots (rounded up to a multiple of 64, so
    fused attention kernels take the mask's row stride). One replay serves every step.
    ``bf16`` as for :class:`GraphedDecoder`, the Linear weights cast once the same way."""

    def __init__(self, model: TransformerLM, state: KVState, capacity: int, bf16: bool | None = None) -> None:
        if not isinstance(model, TransformerLM):
            raise ValueError("GraphedTransformerDecoder needs a TransformerLM")
        self.model = model
        self.use_graphs = model.embed.weight.is_cuda
        self.bf16 = self.use_graphs if bf16 is None else bf16
        self.runner = bf16_linears(model) if self.bf16 else model  # what each step calls
        dtype = torch.bfloat16 if self.bf16 else model.embed.weight.dtype
        self.cache = model.static_cache(state, -(-capacity // 64) * 64, dtype)
        self.pos = state.pos  # tokens in the cache, counted on the host (cache.pos on the device)
        device = model.embed.weight.device
        self.static_tokens = torch.zeros(state.batch_size, 1, dtype=torch.long, device=device)  # (B, 1)
        self.replay: Callable[[], Tensor] | None = None
        self.captures = 0

    def _step(self, commit: bool) -> Tensor:
        """One step at ``cache.pos``. A warm-up (no commit) writes the slot at ``cache.pos`` too,
        harmlessly: no step reads a slot before writing it, and the next step writes that one."""
        device_type = "cuda" if self.use_graphs else "cpu"
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            logits = self.runner.forward_static(self.static_tokens, self.cache)  # (B, 1, V)
        if commit:
            self.cache.pos.add_(1)
        return logits[:, -1]  # (B, V)

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per stream (B, 1); returns the next-token logits (B, V)."""
        _check_step_tokens(tokens, self.cache.batch_size)
        if self.pos >= self.cache.capacity:
            raise ValueError(f"the static KV cache is full ({self.cache.capacity} positions)")
        if self.replay is None:
            self.replay = replayable(self._step, self.use_graphs)
            self.captures += 1
        self.static_tokens.copy_(tokens)
        logits = self.replay()  # (B, V)
        self.pos += 1
        return logits.clone()

    def snapshot(self) -> KVState:
        """The cache so far as an ordinary (growing-cache) KVState."""
        keys = tuple(k[:, :, : self.pos].clone() for k in self.cache.keys)  # (B, H, T, Dh) each
        values = tuple(v[:, :, : self.pos].clone() for v in self.cache.values)  # (B, H, T, Dh) each
        return KVState(keys=keys, values=values, pos=self.pos, batch_size=self.cache.batch_size)
