"""Mixed precision for training: a bf16/fp16 base, float32 trainable weights, autocast, float32 losses.

With a half-precision base (`--dtype bf16|fp16`) the frozen weights stay in that dtype, while every
trainable parameter (the LoRA factors; all weights with --method full) is float32, and so are its
gradients and AdamW states: updates of lr · m/√v (~1e-4 relative) would vanish in bf16's 8-bit mantissa.
The forward runs under `torch.autocast` in the base dtype, so matmuls of the float32 factors with bf16
activations run as bf16 kernels, with float32 accumulation (Micikevicius et al. 2018, "Mixed Precision
Training"). Losses are float32: the head's logits are cast to float32 before the cross-entropy (train/loss.py)
and autocast runs log-softmax and cross-entropy in float32 anyway.

fp16's range is narrow (largest 65504, smallest normal 6e-5), so its gradients are scaled by a
`torch.amp.GradScaler` (dynamic loss scaling) and steps with inf/nan gradients are skipped; bf16 has
float32's range and needs no scaling. The scale is not checkpointed: an fp16 run resumes with a fresh one.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from lorakit.device import HALF_DTYPES


class Precision:
    """Autocast and, for fp16, loss scaling around the Trainer's forward, backward and optimizer step.

    `dtype` is the base's dtype: float32 means no autocast and no scaling (the plain float32 loop).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device_type = device.type
        self.dtype = dtype
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Within the block, ops autocast lists run in the base dtype (matmuls) or float32 (reductions)."""
        if self.dtype not in HALF_DTYPES:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, accelerator: Any, loss: torch.Tensor) -> None:
        """Backward of `loss` (scaled for fp16), outside autocast as torch recommends."""
        accelerator.backward(self.scaler.scale(loss) if self.scaler is not None else loss)

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale in place (before clipping reads them)."""
        if self.scaler is not None:
            self.scaler.unscale_(_inner(optimizer))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step; with fp16 it is skipped when a gradient is inf/nan and the scale adapts."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(_inner(optimizer))
        self.scaler.update()


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (GradScaler passes fused AdamW extra arguments that
    the wrapper's step does not take)."""
    return getattr(optimizer, "optimizer", optimizer)


def keep_trainable_float32(model: nn.Module) -> int:
    """Cast every trainable parameter of `model` that is not float32 to float32 in place; returns how many.

    LoRA factors are created in float32 already; this catches full fine-tuning and modules_to_save copies
    of a half-precision base (their optimizer states follow the parameters' dtype).
    """
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast
