"""Deterministic batch order: a function of (seed, epoch) only, so a resumed run sees the same batches.

Batches are grouped by length to cut padding waste: shuffle, cut into mega-batches of `group` global
batches, sort each mega-batch by length, slice into global batches, then shuffle the global batches.

A global batch holds `batch_size` rows for each of the `world_size` processes, and process `rank` takes
every world_size-th row of it. So N processes with batch size B see, step by step, exactly the rows that
one process with batch size N×B sees; with the loss normalised over the tokens of all processes (see
`loop`), data parallelism changes where the work runs, not the update.
"""

from __future__ import annotations

import torch


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, *, group: int = 32,
                  rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Index batches for one epoch and one process; every process gets the same number of batches."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    global_size = batch_size * world_size
    batches: list[list[int]] = []
    span = global_size * group
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i:i + global_size] for i in range(0, len(chunk), global_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    # Only the last global batch can be short; with fewer rows than processes some process would get none,
    # so it is dropped (the next epoch reshuffles).
    batches = [batches[i] for i in shuffled if len(batches[i]) >= world_size]
    # Interleaved rather than contiguous slices: the rows of a global batch are sorted by length, so every
    # process gets rows of about the same lengths and none waits long for the others.
    return [batch[rank::world_size] for batch in batches]


def batches_per_epoch(n_examples: int, batch_size: int, world_size: int = 1) -> int:
    """How many batches `epoch_batches` gives each process for `n_examples` rows."""
    full, rest = divmod(n_examples, batch_size * world_size)
    return full + (1 if rest >= world_size else 0)


def windows(batches: list[list[int]], grad_accum: int) -> list[list[list[int]]]:
    """Group batches into optimizer steps of `grad_accum` micro-batches (a short last window is kept)."""
    return [batches[i:i + grad_accum] for i in range(0, len(batches), grad_accum)]
