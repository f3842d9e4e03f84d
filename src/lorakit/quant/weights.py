"""The weight of a bitsandbytes layer as a float matrix, and back.

LoRA's merge, DoRA's weight norm and the OLoRA/PiSSA inits need the base weight W as numbers, but a
quantized layer stores codes:

- `Linear8bitLt` (LLM.int8(), Dettmers et al. 2022, arXiv:2208.07339): an int8 (out, in) matrix CB and one
  scale per output row SCB, W = CB · SCB / 127;
- `Linear4bit` (QLoRA, Dettmers et al. 2023, arXiv:2305.14314): 4-bit NF4/FP4 codes packed two per byte,
  one absmax per block of `blocksize` consecutive weights (with double quantization the absmax values are
  themselves 8-bit codes), W = code[q] · absmax_block.

`dequantize_weight` is exact (float32 holds every value these formats represent). `requantize_weight_`
stores a new float W in the layer's own format, which is lossy: each weight becomes the nearest
representable value, so merging an update into a quantized layer changes it by up to half a step.

bitsandbytes is imported only when a quantized layer is met: these checks look at class names, so models
without quantized layers never import it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState


def is_quantized_param(param: Tensor) -> bool:
    """True for a weight that holds bitsandbytes codes rather than float values.

    An `Int8Params` with `has_fp16_weights=True` stores plain float16 and counts as float here.
    """
    kind = type(param).__name__
    if kind == "Params4bit":
        return param.quant_state is not None
    return kind == "Int8Params" and param.dtype == torch.int8


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes linear layer whose weight is quantized (`Linear8bitLt`, `Linear4bit`)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and weight is not None and is_quantized_param(weight)


def compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The float dtype a quantized layer computes in: 4-bit layers' `compute_dtype`, else None (8-bit
    layers compute in their input's dtype)."""
    return getattr(module, "compute_dtype", None)


def dequantize_weight(module: nn.Module) -> Tensor:
    """W of a quantized linear layer as a new (out, in) float32 tensor on the weight's device."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        data, state = _unpacked_4bit(weight)
        return bnbf.dequantize_4bit(data, state).float()
    return bnbf.int8_vectorwise_dequant(weight.data, _row_scales(module)).float()


def requantize_weight_(module: nn.Module, values: Tensor) -> None:
    """Quantize the (out, in) float matrix `values` into `module`'s weight, in its own format (lossy).

    4-bit quantization starts from float32; 8-bit from float16, as bitsandbytes itself quantizes (its CUDA
    kernel takes nothing else; float16's relative rounding, 2⁻¹¹, is far below int8's step of 1/127).
    """
    import bitsandbytes.functional as bnbf

    weight = module.weight
    values = values.detach().to(device=weight.device, dtype=torch.float32).contiguous()
    if type(weight).__name__ == "Params4bit":
        old = weight.quant_state
        data, state = bnbf.quantize_4bit(
            values, blocksize=old.blocksize, compress_statistics=weight.compress_statistics,
            quant_type=old.quant_type, quant_storage=weight.quant_storage,
        )
        # `dtype` only names what dequantizing returns (and what bitsandbytes' CPU path repacks from): keep
        # the
        # layer's, which is not float32 when the model was loaded in bfloat16/float16.
        state.dtype = old.original_dtype if _is_cpu_packed(old) else old.dtype
        _store_4bit(module, data, state)
        return
    codes, scales, _ = bnbf.int8_vectorwise_quant(values.half())
    # In place: after a forward pass `state.CB` is the same tensor as `weight.data` (and `weight.SCB` may be
    # `state.SCB`); copying into every holder keeps them consistent whichever aliases exist.
    state = module.state
    for holder in (weight.data, weight.CB, state.CB):
        if holder is not None:
            holder.copy_(codes)
    for holder in (weight.SCB, state.SCB):
        if holder is not None:
            holder.copy_(scales)


def restore_trainable_4bit_(module: nn.Module) -> None:
    """Keep a `Linear4bit` differentiable on CPUs with AVX512-BF16.

    There, bitsandbytes' first eval-mode forward without gradients repacks the weight in place for its CPU
    inference kernel (absmax rounded to bfloat16), and every later forward, training ones included, runs
    that kernel, which has no backward: the gradient to the layer's input silently becomes None, so the
    adapters of earlier layers get wrong gradients. This turns the repacking off for the layer and, if it
    already happened, stores the same values again in the ordinary (trainable) layout.
    """
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
    weight = getattr(module, "weight", None)
    if type(weight).__name__ == "Params4bit" and _is_cpu_packed(weight.quant_state):
        _store_4bit(module, *_unpacked_4bit(weight))


def _store_4bit(module: nn.Module, codes: Tensor, state: QuantState) -> None:
    # A new tensor rather than copy_: a CPU-packed weight has another shape than ordinary codes. The layer
    # keeps a second reference to the state, which bitsandbytes falls back on if the weight loses its own.
    module.weight.data = codes
    module.weight.quant_state = state
    module.quant_state = state


def _row_scales(module: nn.Module) -> Tensor:
    """SCB of an 8-bit layer: on the weight until its first forward pass, on `module.state` after it."""
    scales = getattr(module.weight, "SCB", None)
    return scales if scales is not None else module.state.SCB


def _is_cpu_packed(state: QuantState) -> bool:
    return bool(getattr(state, "packing_format_for_cpu", False))


def _unpacked_4bit(weight: Tensor) -> tuple[Tensor, QuantState]:
    """(codes, QuantState) of a Params4bit in bitsandbytes' ordinary layout, which `dequantize_4bit` reads.

    A CPU-packed weight (see `restore_trainable_4bit_`) stores codes as (out, in/2) tiles and absmax as an
    (in/blocksize, out) bfloat16 table. bitsandbytes' own inverse restores the codes, but leaves that table
    transposed unless double quantization was on (and then quantizes it again); so the codes come from its
    inverse, run on a copy of the state told to leave absmax alone, and absmax is transposed back here,
    exactly (bfloat16 values are float32 values).
    """
    import bitsandbytes.functional as bnbf

    state = weight.quant_state
    if not _is_cpu_packed(state):
        return weight.data, state
    scratch = copy.copy(state)
    scratch.original_nested = False
    codes, _ = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, scratch)
    absmax = state.absmax.T.reshape(-1).float()
    return codes, bnbf.QuantState(
        absmax=absmax,
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.original_dtype,
    )
