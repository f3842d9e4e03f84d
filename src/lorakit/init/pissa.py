"""PiSSA: principal singular values and vectors as the adapter (Meng et al. 2024, arXiv:2404.02948)."""

from __future__ import annotations

import torch
from torch import Tensor

from lorakit.init.default import LoraInit
from lorakit.init.olora import _check_rank


def init_pissa(weight: Tensor, r: int, scaling: float, niter: int | None = None) -> LoraInit:
    """W ≈ U S Vᵀ; A = diag(√(S_r/s)) V_rᵀ, B = U_r diag(√(S_r/s)); residual W − s · B @ A.

    weight: (out, in), taken in float32 whatever its dtype. `niter=None` uses the full SVD; an integer uses
    torch's randomized SVD (Halko et al. 2011, arXiv:0909.4061) with that many subspace iterations — fast,
    approximate, and drawn from torch's global RNG, so the same seed gives the same factors (and PEFT's).
    Dividing S by s makes s · B @ A equal the top-r part of W (the randomized estimate of it for `niter`),
    and residual + s·B·A reproduces W (up to fp32 rounding) either way.
    """
    weight = weight.float()
    method = "pissa" if niter is None else f"pissa_niter_{niter}"
    _check_rank(method, weight, r)
    if scaling <= 0:
        # √(S/s) has no real value: the factors would be NaN.
        raise ValueError(
            f"init_lora_weights={method!r}: needs a positive scaling (lora_alpha > 0), got {scaling}"
        )
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
