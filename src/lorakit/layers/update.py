"""The LoRA update of a linear layer's output, written once (Hu et al. 2021, arXiv:2106.09685, eq. 3).

Every path that adds a LoRA term to a linear output calls `lora_update`: the general (autograd) path,
the no-grad path for generation, DoRA's direction term (layers/linear.py) and the stacked factors of a
mixed-adapter batch (layers/mixed.py, where `mask` keeps each row to its own adapter's columns).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_update(
    result: Tensor, x: Tensor, a: Tensor, b: Tensor, scaling: float, mask: Tensor | None = None
) -> Tensor:
    """result + scaling · ((x Aᵀ) ⊙ mask) Bᵀ.

    result: (..., out), the base layer's output (or what earlier adapters made of it);
    x: (..., in), already in the factors' dtype and through dropout; a: A (r, in); b: B (out, r);
    mask: broadcastable to (..., r), or None for all ones. Returns (..., out) in the factors' dtype.

    The add is fused into B's matmul (addmm, with the scaling as its alpha): no (tokens × out) temporary
    is made for the update, its scaling or the sum, in the forward pass and in the backward pass alike.
    """
    hidden = F.linear(x, a)
    if mask is not None:
        hidden = hidden * mask
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]).to(hidden.dtype),
        hidden.reshape(-1, hidden.shape[-1]),
        b.t(),
        alpha=scaling,
    )
    return out.view(*result.shape[:-1], out.shape[-1])
