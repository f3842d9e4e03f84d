"""OLoRA: orthonormal initialisation from a QR decomposition (Büyükakyüz 2024, arXiv:2406.01775)."""

from __future__ import annotations

import torch
from torch import Tensor

from lorakit.init.default import LoraInit


def init_olora(weight: Tensor, r: int, scaling: float) -> LoraInit:
    """W = Q R; B = Q[:, :r] (orthonormal columns), A = R[:r]; residual W − s · B @ A.

    weight: (out, in) float32. The base is translated so that residual + s·B·A = W exactly (in fp32).
    """
    q, rr = torch.linalg.qr(weight.float())
    lora_b = q[:, :r].contiguous()
    lora_a = rr[:r].contiguous()
    return LoraInit(lora_a, lora_b, weight.float() - scaling * (lora_b @ lora_a))
