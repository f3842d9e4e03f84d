"""The optimizer, its learning-rate schedule, and how many steps a run takes."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.train.batching import batches_per_epoch
from lorakit.train.config import TuningConfig


def build_optimizer(model: nn.Module, config: TuningConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases, norms and DoRA magnitudes (ndim < 2).

    The fused CUDA kernel is used when every parameter is on a GPU.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(p.device.type == "cuda" for g in groups for p in g["params"])
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TuningConfig, total_steps: int):
    """Linear warm-up, then cosine, linear or constant (transformers' schedules)."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler
    return get_scheduler(
        name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps
    )


def total_optimizer_steps(n_examples: int, config: TuningConfig, world_size: int, repeat: int = 1) -> int:
    """Optimizer steps of the run: --max-steps, else --epochs passes of `repeat` steps per window."""
    batches = batches_per_epoch(n_examples, config.batch_size, world_size)
    if batches == 0:
        # No process could take a step: the loop would go round empty epochs forever.
        raise LorakitError(
            f"{n_examples} training rows: too few to give each of {world_size} processes a batch"
        )
    per_epoch = math.ceil(batches / config.grad_accum) * repeat
    return config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
