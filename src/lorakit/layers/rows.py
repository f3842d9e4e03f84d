"""Mixed-adapter batches: which adapter each row of a batch uses, and where a layer keeps its stacked factors.

`row_adapters(names)` sets, for the duration of a forward or generate call, the adapter of each batch row;
adapter layers read it (`rows_for_batch`) instead of receiving an extra forward argument, so the model's
own forward code is untouched. PEFT's `adapter_names=` argument opens such a block.

One channel, eager and compiled: the rows live in a `threading.local`. torch.compile traces attribute
reads on it and guards on their value (it cannot trace `ContextVar.get`, which would break the graph at
every LoRA layer), so compiled and eager code read the same state.

Thread-safety: each thread sees only its own innermost block, so two threads running two blocks at once
each compute their own rows. asyncio tasks sharing a thread must not hold a block across an `await`
(forward and generate calls are synchronous, so they never do). The stacked factors a layer caches
(`StackSlot`, filled by layers/mixed.py) are replaced, never edited, when they go stale: a thread computes
with the stack it looked up even if another thread swaps in a new one meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

BASE_ROW = "__base__"
"""Name that selects no adapter for a row of a mixed-adapter batch (PEFT's convention)."""

_LOCAL = threading.local()


class RowBlock(tuple):
    """The per-row adapter names of one `row_adapters()` entry, a new object per entry.

    Its identity marks one forward or generate call, so per-layer caches (layers/mixed.py) can check once per
    call, not at every decoding step, that what they hold is still current.
    """

    __slots__ = ()


@contextmanager
def row_adapters(names: Sequence[str]) -> Iterator[None]:
    """Within the block, batch row i uses adapter `names[i]` in every adapter layer (of this thread).

    Layers check once per block (and when grad or train mode changes) that the adapter factors they stacked
    are current (layers/mixed.py), so adapters edited inside one block without such a change are not seen
    there. `PeftModel.forward`/`generate(adapter_names=...)` open one block per call.
    """
    previous = getattr(_LOCAL, "block", None)
    _LOCAL.block = RowBlock(names)
    try:
        yield
    finally:
        _LOCAL.block = previous


def current_block() -> RowBlock | None:
    """The innermost `row_adapters()` entry of this thread; None outside one, and while torch.compile traces
    (traced code must not hold on to one call's object, so compiled layers do not cache against it)."""
    return None if torch.compiler.is_compiling() else getattr(_LOCAL, "block", None)


def rows_for_batch(batch_size: int) -> tuple[str, ...] | None:
    """The per-row adapter names for a batch, expanded when generate() repeats rows (beams, samples)."""
    names = getattr(_LOCAL, "block", None)
    if names is None:
        return None
    if batch_size % len(names):
        raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch_size} rows")
    repeat = batch_size // len(names)
    return tuple(n for n in names for _ in range(repeat)) if repeat > 1 else names


def mixed_rows_active() -> bool:
    """Whether a mixed-adapter batch is being computed (rows may use different adapters)."""
    return getattr(_LOCAL, "block", None) is not None


def row_groups(names: Sequence[str], device: torch.device) -> Iterator[tuple[str, Tensor]]:
    """(adapter name, row indices) for each adapter used in a mixed batch, base rows skipped."""
    for name in dict.fromkeys(names):
        if name != BASE_ROW:
            yield name, torch.tensor([i for i, n in enumerate(names) if n == name], device=device)


class StackSlot:
    """Where an adapter layer keeps its stacked factors for mixed batches (layers/mixed.py).

    A cache: a copy of the layer (deepcopy, pickle) starts with an empty slot, and the stack is rebuilt on
    first use, since what it holds refers to the original layer's tensors.
    """

    __slots__ = ("stack",)

    def __init__(self) -> None:
        self.stack: Any = None

    def __reduce__(self) -> tuple[type, tuple]:
        return StackSlot, ()

    def clear(self) -> None:
        self.stack = None
