"""Model states to and from flat tensor dictionaries (for safetensors) plus a JSON header.

Every state tensor is real (S4D states hold (Re, Im) in a last axis of 2); nothing is pickled.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from horizonlm.errors import HorizonError
from horizonlm.ops.count_cache import CountTables
from horizonlm.peers.gla import GLAState
from horizonlm.state import (
    BlockState,
    CountCacheState,
    HorizonState,
    KVState,
    MemoryState,
    SupervisorState,
)


def state_to_tensors(state: HorizonState | KVState | GLAState, prefix: str = "state."
                     ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if isinstance(state, GLAState):
        header = {"kind": "gla", "pos": state.pos, "batch_size": state.batch_size, "layers": len(state.layers)}
        return {f"{prefix}gla{i}": t.contiguous() for i, t in enumerate(state.layers)}, header
    tensors: dict[str, Tensor] = {}
    if isinstance(state, KVState):
        for i, (k, v) in enumerate(zip(state.keys, state.values)):
            tensors[f"{prefix}kv{i}.k"] = k.contiguous()
            tensors[f"{prefix}kv{i}.v"] = v.contiguous()
        return tensors, {"kind": "kv", "pos": state.pos, "batch_size": state.batch_size, "layers": len(state.keys)}
    for i, block in enumerate(state.blocks):
        if block.ssm is not None:
            tensors[f"{prefix}block{i}.ssm"] = block.ssm.contiguous()
        if block.conv is not None:
            tensors[f"{prefix}block{i}.conv"] = block.conv.contiguous()
    if state.supervisor is not None:
        tensors[f"{prefix}supervisor.s"] = state.supervisor.s.contiguous()
    if isinstance(state.memory, MemoryState):
        tensors[f"{prefix}memory.keys"] = state.memory.keys.contiguous()
        tensors[f"{prefix}memory.values"] = state.memory.values.contiguous()
        tensors[f"{prefix}memory.chunk_ids"] = state.memory.chunk_ids.contiguous()
        if state.memory.last_key is not None:
            tensors[f"{prefix}memory.last_key"] = state.memory.last_key.contiguous()
        if state.memory.tail is not None:
            tensors[f"{prefix}memory.tail"] = state.memory.tail.contiguous()
        if state.memory.live_from is not None:
            tensors[f"{prefix}memory.live_from"] = state.memory.live_from.contiguous()
    if state.counts is not None:
        for name, t in state.counts.tables._asdict().items():
            tensors[f"{prefix}counts.{name}"] = t.contiguous()
        tensors[f"{prefix}counts.tail"] = state.counts.tail.contiguous()
    header = {"kind": "horizon", "pos": state.pos, "batch_size": state.batch_size, "layers": len(state.blocks),
              "supervisor": state.supervisor is not None, "memory": isinstance(state.memory, MemoryState),
              "counts": state.counts is not None}
    return tensors, header


def state_from_tensors(tensors: dict[str, Tensor], header: dict[str, Any], prefix: str = "state."
                       ) -> HorizonState | KVState | GLAState:
    try:
        pos, batch = int(header["pos"]), int(header["batch_size"])
        if header["kind"] == "gla":
            layers = tuple(tensors[f"{prefix}gla{i}"] for i in range(int(header["layers"])))
            return GLAState(layers=layers, pos=pos, batch_size=batch)
        if header["kind"] == "kv":
            n = int(header["layers"])
            keys = tuple(tensors[f"{prefix}kv{i}.k"] for i in range(n))
            values = tuple(tensors[f"{prefix}kv{i}.v"] for i in range(n))
            return KVState(keys=keys, values=values, pos=pos, batch_size=batch)
        blocks = []
        for i in range(int(header["layers"])):
            blocks.append(BlockState(ssm=tensors.get(f"{prefix}block{i}.ssm"), conv=tensors.get(f"{prefix}block{i}.conv")))
        sup = SupervisorState(s=tensors[f"{prefix}supervisor.s"], pos=pos) if header["supervisor"] else None
        mem = (MemoryState(keys=tensors[f"{prefix}memory.keys"], values=tensors[f"{prefix}memory.values"],
                           chunk_ids=tensors[f"{prefix}memory.chunk_ids"], pos=pos,
                           last_key=tensors.get(f"{prefix}memory.last_key"), tail=tensors.get(f"{prefix}memory.tail"),
                           live_from=tensors.get(f"{prefix}memory.live_from"))
               if header["memory"] else None)
        counts = (CountCacheState(CountTables(*(tensors[f"{prefix}counts.{name}"] for name in CountTables._fields)),
                                  tail=tensors[f"{prefix}counts.tail"], pos=pos)
                  if header.get("counts") else None)  # states saved before the count cache have none
    except KeyError as err:
        raise HorizonError(f"saved model state is incomplete: missing {err}") from err
    return HorizonState(pos=pos, blocks=tuple(blocks), supervisor=sup, memory=mem, batch_size=batch, counts=counts)
