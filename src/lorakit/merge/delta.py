"""The merge maths as pure tensor functions, shared by the in-memory layers and the streaming merge.

Conventions: every function works in float32 and returns float32; callers round once into the stored
dtype. A "delta" is always in the layout of the stored base weight:

- `nn.Linear`: weight (out, in), delta = s · B @ A;
- GPT-2 `Conv1D` (fan_in_fan_out): weight (in, out), delta = s · (B @ A)ᵀ;
- `nn.Embedding`: weight (num_embeddings, dim), PEFT stores A as (r, num_embeddings) and B as
  (dim, r), delta = s · (B @ A)ᵀ.

`feature_axis` names the axis of the stored weight that indexes output features; DoRA's magnitude
vector has one entry per output feature and its norms run over the other axis.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lora_delta(lora_A: Tensor, lora_B: Tensor, scaling: float, transpose: bool = False) -> Tensor:
    """ΔW = scaling · B @ A in float32 (A: (r, in), B: (out, r)); transposed for fan_in_fan_out layouts."""
    delta = (lora_B.float() @ lora_A.float()).mul_(scaling)
    return delta.T if transpose else delta


def dora_norm(weight: Tensor, feature_axis: int) -> Tensor:
    """Column norm ‖W‖_c of DoRA (Liu et al. 2024, arXiv:2402.09353): one L2 norm per output feature, over
    every other axis (a convolution's input channels and kernel positions too)."""
    return torch.linalg.vector_norm(weight.float(), dim=[d for d in range(weight.dim()) if d != feature_axis])


def _along(vector: Tensor, feature_axis: int, ndim: int) -> Tensor:
    """One value per output feature, shaped to scale a weight of `ndim` axes feature by feature."""
    return vector.reshape([-1 if d == feature_axis else 1 for d in range(ndim)])


def dora_merge(weight: Tensor, delta: Tensor, magnitude: Tensor, feature_axis: int) -> tuple[Tensor, Tensor]:
    """Merged DoRA weight m · (W + ΔW) / ‖W + ΔW‖_c, and the norm (needed to unmerge). `magnitude` holds one
    value per output feature, in any shape (PEFT stores a convolution's as (1, out, 1, …))."""
    combined = weight.float() + delta
    norm = dora_norm(combined, feature_axis)
    return combined.mul_(_along(magnitude.float().reshape(-1) / norm, feature_axis, combined.dim())), norm


def dora_unmerge(merged: Tensor, delta: Tensor, magnitude: Tensor, norm: Tensor, feature_axis: int) -> Tensor:
    """Inverse of `dora_merge` given the norm it returned: W = merged · ‖W + ΔW‖_c / m − ΔW."""
    return merged.float() * _along(norm / magnitude.float().reshape(-1), feature_axis, merged.dim()) - delta


def add_delta(weight: Tensor, delta: Tensor) -> Tensor:
    """W + ΔW computed in float32 (one rounding when the caller casts back). `delta` is a float32 temporary
    the caller gives up: when both are contiguous the sum is written into it, one pass over W and no
    float32 copy of it (a bfloat16 W is widened element by element, exactly), the same bits and layout as
    `W.float() + ΔW`, which transposed layouts keep (a later norm reduces in layout order)."""
    if weight.shape == delta.shape and weight.is_contiguous() and delta.is_contiguous():
        return delta.add_(weight)
    return weight.float() + delta
