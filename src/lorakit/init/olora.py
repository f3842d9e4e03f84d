"""OLoRA: orthonormal initialisation from a QR decomposition (Büyükakyüz 2024, arXiv:2406.01775)."""

from __future__ import annotations

import torch
from torch import Tensor

from lorakit.init.default import LoraInit


def init_olora(weight: Tensor, r: int, scaling: float) -> LoraInit:
    """W = Q R; B = Q[:, :r] (orthonormal columns), A = R[:r]; residual W − s · B @ A.

    weight: (out, in), taken in float32 whatever its dtype, so the caller rounds the residual into the
    base dtype once. The base is translated so that residual + s·B·A = W exactly (in fp32); the residual
    is not W's rank-r remainder unless s = 1 (A, B are not rescaled by s, as in PEFT).
    """
    weight = weight.float()
    _check_rank("olora", weight, r)
    q, rr = torch.linalg.qr(weight)
    lora_b = q[:, :r].contiguous()
    lora_a = rr[:r].contiguous()
    return LoraInit(lora_a, lora_b, weight - scaling * (lora_b @ lora_a))


def _check_rank(method: str, weight: Tensor, r: int) -> None:
    # A reduced QR/SVD has only min(out, in) components; a larger r would leave the factors short of the
    # r rows/columns the adapter holds (zero-padding them would give rows that never receive a gradient).
    if r > min(weight.shape):
        raise ValueError(
            f"init_lora_weights={method!r}: r={r} exceeds min(out, in) of a {tuple(weight.shape)} weight"
        )
