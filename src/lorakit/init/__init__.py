"""Adapter initialisation: one pure function per method, weight in → (A, B, residual weight) out.

Every initialiser takes the base weight as (out, in) float32, the rank r and the layer's scaling s, and
returns A (r, in), B (out, r) and the residual weight to store in the base layer (None when the base is
left untouched). The contract: residual + s · B @ A == weight, so outputs are unchanged at step 0
(except for `init_lora_weights=False`, which starts from a random, non-zero update).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

from torch import Tensor

from lorakit.init.default import (
    LoraInit,
    init_embedding,
    init_gaussian,
    init_kaiming,
    init_random,
    init_zeros,
)
from lorakit.init.olora import init_olora
from lorakit.init.pissa import init_pissa

Initialiser = Callable[[Tensor, int, float], LoraInit]

__all__ = ["LoraInit", "Initialiser", "init_embedding", "init_zeros", "initialiser", "moves_base_weight"]


def initialiser(method: bool | str) -> Initialiser:
    """The function for a `LoraConfig.init_lora_weights` value."""
    if method is True:
        return init_kaiming
    if method is False:
        return init_random
    if method == "gaussian":
        return init_gaussian
    if method == "olora":
        return init_olora
    if method == "pissa":
        return init_pissa
    match = re.fullmatch(r"pissa_niter_(\d+)", str(method))
    if match:
        return partial(init_pissa, niter=int(match.group(1)))
    raise ValueError(f"init_lora_weights: unknown method {method!r}")


def moves_base_weight(method: bool | str) -> bool:
    """True for methods (OLoRA, PiSSA) that replace the base weight by a residual."""
    return isinstance(method, str) and (method == "olora" or method.startswith("pissa"))
