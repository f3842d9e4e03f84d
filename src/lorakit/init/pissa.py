"""PiSSA: principal singular values and vectors as the adapter (Meng et al. 2024, arXiv:2404.02948)."""

from __future__ import annotations

import torch
from torch import Tensor

from lorakit.init.default import LoraInit


def init_pissa(weight: Tensor, r: int, scaling: float, niter: int | None = None) -> LoraInit:
    """W ≈ U S Vᵀ; A = diag(√(S_r/s)) V_rᵀ, B = U_r diag(√(S_r/s)); residual W − s · B @ A.

    weight: (out, in) float32. `niter=None` uses the full SVD; an integer uses torch's randomized
    SVD (Halko et al.) with that many subspace iterations — fast, approximate, and seeded by torch's RNG.
    Dividing S by s makes s · B @ A equal the top-r part of W.
    """
    weight = weight.float()
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
        vh = v.T
    root = torch.sqrt(s / scaling)
    lora_a = (root[:, None] * vh).contiguous()
    lora_b = (u * root[None, :]).contiguous()
    return LoraInit(lora_a, lora_b, weight - scaling * (lora_b @ lora_a))
