"""DoRA forward maths (Liu et al. 2024, arXiv:2402.09353), as PEFT computes it.

DoRA splits the adapted weight into magnitude and direction: W' = m · (W + s·BA) / ‖W + s·BA‖_c. The norm
is detached (the paper's §4.3: treated as a constant, which saves memory and barely changes the
gradient), so the forward pass only needs the per-feature factor m / ‖W + s·BA‖_c.
"""

from __future__ import annotations

from torch import Tensor

from lorakit.merge.delta import dora_norm


def magnitude_scale(
    weight: Tensor, lora_weight: Tensor, scaling: float, magnitude: Tensor, feature_axis: int
) -> Tensor:
    """m / ‖W + s·ΔW‖_c with the norm detached; one entry per output feature, shape (out,).

    weight: the stored base weight; lora_weight: B @ A in that same layout (no scaling applied); magnitude:
    one value per output feature, in any shape.
    """
    combined = weight.to(lora_weight.dtype) + scaling * lora_weight.detach()
    return magnitude.reshape(-1) / dora_norm(combined, feature_axis).detach().to(magnitude.dtype)


def linear_term(base_out: Tensor, adapted_out: Tensor, scale: Tensor) -> Tensor:
    """What DoRA adds to a linear layer's output: (m/‖·‖) · (W x + s · B A x) − W x.

    base_out is W x without the bias (the bias is not rescaled); adapted_out is W x + s · B A x (the LoRA
    update of base_out); scale, m/‖·‖, has shape (out,).
    """
    return scale * adapted_out - base_out
