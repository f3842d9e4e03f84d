"""Optional GPU kernels for training (`--liger`): liger-kernel's Triton RMSNorm, RoPE and SwiGLU.

liger-kernel (Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training") fuses the
elementwise work around the matmuls of a decoder layer: the RMSNorm's reduction and scale, the rotary
embedding of q and k, and SiLU(gate) · up, each one kernel in the forward and one in the backward, instead
of several torch ops that each read and write a (tokens × hidden) tensor. The model instance is patched in
place; its LoRA layers are untouched, since the patched MLP still calls its (wrapped) projections.

Its fused linear cross-entropy is not used: lorakit's loss already runs the head only on the supervised
(answer) positions, in chunks (train/loss.py), and keeps prefix sharing. Installed with the `gpu` extra,
never on CPU machines: the kernels need Triton and a CUDA GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import LorakitError, MissingDependencyError

LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}


def apply_liger(model: nn.Module, device: torch.device) -> None:
    """Patch `model` (a transformers causal LM on `device`) with liger-kernel's RMSNorm, RoPE and SwiGLU.

    Raises LorakitError off CUDA or for an architecture liger-kernel does not patch, and
    MissingDependencyError when liger-kernel is not installed.
    """
    if device.type != "cuda":
        raise LorakitError(f"--liger: liger-kernel's Triton kernels need a CUDA GPU; this run is on {device}")
    try:
        from liger_kernel.transformers.monkey_patch import (
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )
    except ImportError:
        raise MissingDependencyError("--liger needs liger-kernel: pip install 'lorakit[gpu]'") from None
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise LorakitError(f"--liger: liger-kernel has no kernels for model type {model_type!r}; run without "
                           "--liger")
    _apply_liger_kernel_to_instance(model=model, **LIGER_KERNELS)
