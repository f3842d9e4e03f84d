"""Deterministic batch order: a function of (seed, epoch) only, so a resumed run sees the same batches.

Batches are grouped by length to cut padding waste: shuffle, cut into mega-batches of `group`
batches, sort each mega-batch by length, slice into batches, then shuffle the batches. Each process
of a distributed run takes every world_size-th batch.
"""

from __future__ import annotations

import torch


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, *, group: int = 32,
                  rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Index batches for one epoch and one process; every process gets the same number of batches."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches: list[list[int]] = []
    span = batch_size * group
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    batches = [batches[i] for i in shuffled]
    usable = len(batches) - len(batches) % world_size
    return batches[rank:usable:world_size]


def windows(batches: list[list[int]], grad_accum: int) -> list[list[list[int]]]:
    """Group batches into optimizer steps of `grad_accum` micro-batches (a short last window is kept)."""
    return [batches[i:i + grad_accum] for i in range(0, len(batches), grad_accum)]
