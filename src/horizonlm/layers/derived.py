"""Tensors computed from a module's parameters alone, kept between calls made without gradients."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


class Derived(Generic[T]):
    """What a layer computes from its parameters alone (the S4D discretisation, the folded
    convolution kernel), kept between calls made without gradients until a parameter changes:
    its storage, dtype or in-place version (an optimizer step, ``.to()``, a loaded state dict).
    A decode step would otherwise redo that work in every block at every token. With gradients
    it is recomputed and nothing is kept. A CUDA graph captured over a step reads the kept
    tensors, so a graphed decoder decodes with the weights it was captured with."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: T | None = None

    def __call__(self, params: Sequence[Tensor], tag: Hashable, compute: Callable[[], T]) -> T:
        """``compute()``, or what it returned last for the same ``params`` (unchanged) and ``tag``
        (what else the result depends on: a dtype, a device)."""
        if torch.is_grad_enabled():
            return compute()
        key = (tag, *((p.data_ptr(), p.dtype, p._version) for p in params))
        if key != self.key:
            self.value, self.key = compute(), key
        return self.value
