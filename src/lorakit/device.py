"""Where a model runs and in which precision its base weights are held: `--device` and `--dtype`.

`--device auto|cpu|cuda|cuda:N`: auto is the first CUDA GPU when torch sees one, else the CPU.
`--dtype auto|bf16|fp16|fp32` is the dtype of the *base* weights: auto is bf16 on a CUDA GPU that supports
it and fp32 elsewhere (the CPU keeps the float32 numbers lorakit is verified with). LoRA factors stay in
float32 whatever the base dtype (PEFT's `autocast_adapter_dtype`); training runs the forward under autocast
in the base dtype (train/precision.py).
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from lorakit.errors import LorakitError

DtypeName = Literal["auto", "bf16", "fp16", "fp32"]
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HALF_DTYPES = (torch.bfloat16, torch.float16)
DEVICE_HELP = "auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N."
DTYPE_HELP = (
    "Base weights' dtype: bf16, fp16, fp32, or auto (bf16 on a GPU that supports it, else fp32). "
    "LoRA factors stay float32."
)
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def valid_device_name(name: str) -> bool:
    """Whether `name` is a `--device` value (auto, cpu, cuda, cuda:N); availability is checked later."""
    return _DEVICE.fullmatch(name) is not None


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for a `--device` value; raises LorakitError for a GPU that is not there."""
    if not valid_device_name(name):
        raise LorakitError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LorakitError(
            f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}); use --device cpu"
        )
    device = torch.device(name)
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise LorakitError(
            f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) here (cuda:0 .. "
            f"cuda:{torch.cuda.device_count() - 1})"
        )
    return torch.device("cuda", index)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The base dtype for a `--dtype` value on `device` (see the module docstring for auto)."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if name not in DTYPES:
        raise LorakitError(f"--dtype {name!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]
