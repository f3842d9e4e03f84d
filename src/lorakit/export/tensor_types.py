"""GGUF tensor types: which type each tensor gets, and the bytes it is stored as.

Floating types are rounded by torch from the float32 merge (one rounding, as `lorakit merge` does); block
quantization uses the `gguf` package's quantizers, which reproduce llama.cpp's reference ones:

    q8_0   blocks of 32 values: one f16 scale d = max|x|/127 and 32 int8 q, x ≈ d·q   (8.5 bits/weight)
    q5_0/q5_1, q4_0/q4_1   32-value blocks of 5/4-bit codes, with a scale (and a minimum for *_1)

As llama.cpp's converter does, vectors (norms, biases) stay float32 whatever the requested type, and a
matrix whose rows are not a whole number of blocks falls back to f16.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType, quants
from torch import Tensor

Q = GGMLQuantizationType
# Output type name → (tensor type, the file's general.file_type).
TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def parse_type(name: str) -> GGMLQuantizationType:
    if name not in TYPES:
        raise ValueError(f"GGUF type {name!r}: expected one of {', '.join(TYPES)}")
    return TYPES[name][0]


def tensor_type(shape: tuple[int, ...], requested: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type one tensor is stored in, for the requested output type."""
    if len(shape) < 2:
        return Q.F32
    if requested in FLOAT_TYPES:
        return requested
    block, _ = GGML_QUANT_SIZES[requested]
    return requested if shape[-1] % block == 0 else Q.F16


def stored_shape(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and numpy dtype of the array holding a tensor of `shape` in `qtype` (bytes for block types)."""
    if qtype == Q.F32:
        return shape, np.dtype(np.float32)
    if qtype == Q.F16:
        return shape, np.dtype(np.float16)
    return quants.quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8)


def encode(rows: Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """Rows of a tensor (any float dtype) as stored in `qtype`; rows are independent in every type."""
    if qtype in FLOAT_TYPES:
        rounded = rows.to(FLOAT_TYPES[qtype]).contiguous()
        if qtype == Q.BF16:  # numpy has no bfloat16: its bytes, as the gguf package stores them
            return rounded.view(torch.int16).numpy().view(np.uint8)
        return rounded.numpy()
    return quants.quantize(rows.float().contiguous().numpy(), qtype)


def type_name(qtype: GGMLQuantizationType) -> str:
    return qtype.name.lower()
