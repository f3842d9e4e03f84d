"""Loading a base model quantized by bitsandbytes, and preparing it for LoRA training (QLoRA).

    from lorakit.quant import quantization_config, prepare_for_kbit_training
    model = load_causal_lm(None, quantization_config=quantization_config(load_in_4bit=True))
    model = prepare_for_kbit_training(model, gradient_checkpointing=True)
    peft_model = get_peft_model(model, LoraConfig(...))
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lorakit.checkpointing import enable_activation_checkpointing
from lorakit.errors import MissingDependencyError
from lorakit.quant.weights import is_quantized_param, restore_trainable_4bit_

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

MIN_BITSANDBYTES = "0.49"
_INSTALL = f"pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'"
QUANT_TYPES = ("nf4", "fp4")

# Devices on which bitsandbytes has already quantized a test tensor in this process.
_WORKS_ON: set[str] = set()


def require_bitsandbytes(device: torch.device | str | None = None) -> ModuleType:
    """bitsandbytes, checked to be recent enough and to run on `device` (default: CUDA if present, else CPU).

    Raises MissingDependencyError (one line, with the install command) when it is missing, too old, or
    has no working build for this machine; the check quantizes a 64-value tensor once per device.
    """
    try:
        import bitsandbytes
    except ImportError as error:
        raise MissingDependencyError(
            f"bitsandbytes: not installed; 8-bit/4-bit models need it: {_INSTALL}"
        ) from error
    except Exception as error:  # a broken install (e.g. missing CUDA libraries) fails with anything
        raise MissingDependencyError(
            f"bitsandbytes: cannot be imported ({_first_line(error)}); {_INSTALL}"
        ) from error
    from packaging.version import Version

    version = getattr(bitsandbytes, "__version__", "0")
    if Version(version) < Version(MIN_BITSANDBYTES):
        raise MissingDependencyError(
            f"bitsandbytes: version {version} is too old (need >= {MIN_BITSANDBYTES}); {_INSTALL}"
        )
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in _WORKS_ON:
        try:
            bitsandbytes.functional.quantize_4bit(torch.ones(64, device=device), quant_type="nf4")
        except Exception as error:
            raise MissingDependencyError(
                f"bitsandbytes: version {version} cannot run on {device.type} ({_first_line(error)}); "
                f"install a build for this machine: {_INSTALL}"
            ) from error
        _WORKS_ON.add(device.type)
    return bitsandbytes


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def default_compute_dtype() -> torch.dtype:
    """What 4-bit layers compute in: bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on
    the CPU (where bitsandbytes' float16 paths are slow and bfloat16 gains nothing for training)."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> BitsAndBytesConfig:
    """transformers' `BitsAndBytesConfig` for `from_pretrained(..., quantization_config=...)`.

    load_in_8bit: LLM.int8() (about 1 byte per weight); load_in_4bit: QLoRA's 4-bit storage (about 0.5 byte
    per weight) with `quant_type` "nf4" (NormalFloat, for normally distributed weights) or "fp4",
    `double_quant` also quantizing the per-block scales (saves ~0.37 bit per weight), and `compute_dtype`
    (default: `default_compute_dtype()`). Checks that bitsandbytes is installed and runs here.
    """
    if load_in_8bit == load_in_4bit:
        raise ValueError("quantization_config: set exactly one of load_in_8bit and load_in_4bit")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quantization_config: quant_type expected one of {QUANT_TYPES}, got {quant_type!r}")
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype or default_compute_dtype(),
    )


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = False,
                              gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """Make a quantized transformers model ready for adapter training (in place; returns it), as PEFT's
    `prepare_model_for_kbit_training` does:

    - every base parameter is frozen;
    - float16/bfloat16 parameters that are not quantized storage (layer norms, embeddings, lm_head, biases)
      become float32: norms and the loss are where half precision loses training signal, and they are a
      small part of the memory;
    - with `gradient_checkpointing`, checkpointing is turned on (non-reentrant unless the kwargs say
      otherwise) and the input embeddings' output requires grad, which reentrant checkpointing needs to
      reach the adapters when the embeddings are frozen.

    Also keeps 4-bit layers differentiable on CPUs with AVX512-BF16 (see `restore_trainable_4bit_`).
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and not _quantized_storage(param):
            param.data = param.data.float()
    for module in model.modules():
        restore_trainable_4bit_(module)
    if gradient_checkpointing:
        model.enable_input_require_grads()
        kwargs = (
            gradient_checkpointing_kwargs
            if gradient_checkpointing_kwargs is not None
            else {"use_reentrant": False}
        )
        enable_activation_checkpointing(model, kwargs)
    return model


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """`prepare_for_kbit_training` under PEFT's name and defaults (gradient checkpointing on), so PEFT code
    runs unchanged."""
    return prepare_for_kbit_training(model, gradient_checkpointing=use_gradient_checkpointing,
                                     gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)


def _quantized_storage(param: Tensor) -> bool:
    # A 4-bit weight may be packed into a float16/bfloat16 tensor (bnb_4bit_quant_storage): casting it
    # would destroy the codes.
    return type(param).__name__ == "Params4bit" or is_quantized_param(param)
