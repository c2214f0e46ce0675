"""Chunk bookkeeping shared by the supervisor and the memory.

Chunks are counted from the start of the stream: position ``p`` lies in chunk ``p // C``, and
chunk ``c`` completes at its last token, position ``(c+1)*C - 1``. A token at position ``p`` may
use only chunks completed strictly before it: there are ``p // C`` of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ChunkLayout:
    """Where chunks end inside one call of ``length`` tokens starting at stream position ``pos``."""

    ends: Tensor
    """Local indices of the tokens that complete a chunk, ascending. (m,) int64"""
    chunk_ids: Tensor
    """Stream-wide index of each chunk completed in the call. (m,) int64"""
    completed_before: Tensor
    """For each local token, how many chunks of the whole stream completed before it. (L,) int64"""
    completed_in_call_before: Tensor
    """For each local token, how many of this call's chunk ends lie before it. (L,) int64"""


def chunk_layout(pos: int, length: int, chunk_size: int, device: torch.device | None = None) -> ChunkLayout:
    """Computed from Python integers, so it never waits on the device."""
    first_end = (chunk_size - 1 - pos % chunk_size) % chunk_size
    ends = torch.arange(first_end, max(first_end, length), chunk_size, device=device)  # (m,)
    completed_before = torch.arange(pos, pos + length, device=device) // chunk_size  # (L,)
    return ChunkLayout(
        ends=ends,
        chunk_ids=(pos + ends + 1) // chunk_size - 1,  # (m,)
        completed_before=completed_before,
        completed_in_call_before=completed_before - pos // chunk_size,  # (L,)
    )
