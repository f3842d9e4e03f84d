"""How the processes of a run share the work: data parallelism (the default) or FSDP2 sharding (`--fsdp`).

`DataParallel`: every process holds the whole model (frozen base, adapter, optimizer state); accelerate
wraps the objective's module in DDP and gradients are averaged after each accumulation window. Checkpoints
and the best model are written by the main process from its own copy.

`FullySharded` (train/fsdp.py): PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every decoder
layer and the root, so each of N processes holds 1/N of the frozen base, of the adapter and of the AdamW
state; a layer's full weights exist only while it runs. Checkpoints are sharded (every process writes its
own part with `torch.distributed.checkpoint`) and the best adapter is gathered and written once, in PEFT's
format.

Both give the same update: the loss of a window is divided by the window's count over all processes and
both reduce gradients by averaging over processes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.train.checkpoint import Progress, load_checkpoint, save_checkpoint


class DataParallel:
    """DDP through accelerate (one process: no wrapping at all)."""

    sharded = False

    def __init__(self, accelerator: Any) -> None:
        self.acc = accelerator
        self.main = accelerator.is_main_process

    def setup(self, module: nn.Module) -> None:
        """Make the Trainer's objective module ready for the processes before the optimizer is built
        (nothing to do for DDP)."""

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """The module to call (DDP-wrapped under a launch of several processes) and the optimizer."""
        return self.acc.prepare(module, optimizer)

    def no_sync(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce for every micro-batch of a window but the last."""
        return contextlib.nullcontext() if last else self.acc.no_sync(module)

    def clip_grad_norm(self, module: nn.Module, max_norm: float) -> float:
        return float(self.acc.clip_grad_norm_(module.parameters(), max_norm))

    def save_best(self, model: nn.Module, directory: Path, tokenizer: Any) -> None:
        """Atomically replace `directory` with the trained adapter alone (PEFT format; never a frozen
        reference adapter), or the full model with its tokenizer."""
        from lorakit.io.atomic import atomic_directory

        if not self.main:
            return
        with atomic_directory(directory, overwrite=True) as tmp:
            if hasattr(model, "peft_config"):
                model.save_pretrained(tmp, selected_adapters=[model.active_adapter])
            else:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)

    def save_checkpoint(self, directory: Path, model: nn.Module, optimizer: Any, scheduler: Any,
                        progress: Progress, objective_state: dict[str, Any]) -> None:
        self.acc.wait_for_everyone()
        if self.main:
            save_checkpoint(directory, model, optimizer, scheduler, progress, objective_state)
        self.acc.wait_for_everyone()

    def load_checkpoint(self, directory: Path, model: nn.Module, optimizer: Any,
                        scheduler: Any) -> tuple[Progress, dict[str, Any]]:
        return load_checkpoint(directory, model, optimizer, scheduler)

    def memory(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """Bytes this process holds: parameters, gradients (of trainable parameters) and optimizer state."""
        params = list(model.parameters())
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return {"rank_parameter_bytes": sum(_local_bytes(p) for p in params),
                "rank_gradient_bytes": sum(_local_bytes(p) for p in params if p.requires_grad),
                "rank_optimizer_bytes": sum(_local_bytes(t) for t in state)}


def _local_bytes(tensor: torch.Tensor) -> int:
    """Bytes of this process's part of a tensor (a DTensor's local shard)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()
