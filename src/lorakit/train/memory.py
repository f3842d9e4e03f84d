"""Per-process training memory, predicted: what data parallelism and FSDP2 sharding each hold.

For a model with F frozen parameters of b bytes each and T trainable float32 parameters trained with AdamW
(two float32 states per parameter), one process of N holds

    DDP (replicated):      parameters F·b + 4T,       gradients 4T,     optimizer 8T
    FSDP2 (sharded):       parameters (F·b + 4T) / N, gradients 4T / N, optimizer 8T / N

plus activations, which depend on the batch and sequence length and are not counted here (gradient
checkpointing keeps one layer's). FSDP2 also gathers one layer's full weights at a time while it runs, a
transient of (layer parameters)·(N−1)/N that the table leaves out too. The run report's
`rank_*_bytes` are the same three figures measured on the live tensors (tests check that they agree).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ADAMW_STATES = 2
TRAINABLE_BYTES = 4  # LoRA factors (and their gradients and AdamW states) stay in float32


@dataclass(frozen=True)
class RankMemory:
    parameters: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


def rank_memory(
    frozen_bytes: float, trainable_params: int, world_size: int = 1, sharded: bool = False
) -> RankMemory:
    """Bytes one process holds for parameters, gradients and AdamW state (the module docstring's formula);
    `frozen_bytes` is F·b, the frozen weights' size as stored."""
    share = world_size if sharded else 1
    trainable = trainable_params * TRAINABLE_BYTES
    return RankMemory(parameters=round((frozen_bytes + trainable) / share),
                      gradients=round(trainable / share), optimizer=round(ADAMW_STATES * trainable / share))


def frozen_bytes(model: nn.Module, dtype_bytes: float, linear_bytes: float | None = None) -> float:
    """Stored size of a model's weights at `dtype_bytes` per parameter; with `linear_bytes`, its linear layers
    but the output head at that size instead (bitsandbytes NF4: 0.5 byte + a float32 scale per 64 weights)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    total = sum(p.numel() for p in model.parameters())
    if linear_bytes is None:
        return total * dtype_bytes
    return (total - linear) * dtype_bytes + linear * linear_bytes


def lora_parameters(model: nn.Module, r: int) -> int:
    """LoRA parameters of rank r on every linear layer but the output head: Σ r·(in + out)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sum(r * (m.in_features + m.out_features) for m in model.modules()
               if isinstance(m, nn.Linear) and m is not head)
