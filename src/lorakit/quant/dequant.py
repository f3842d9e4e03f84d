"""Turning a bitsandbytes-quantized model back into a float model, for merging adapters into it.

`PeftModel.merge_and_unload()` on a quantized base merges here by default: every quantized layer becomes an
`nn.Linear` holding its exact dequantized weight in float32, the adapters are added in float32 (one
rounding at the end, as for float bases), and the layers are then cast once to the model's float dtype.
The result is a plain float model (no quantization config, saves and reloads as one) that carries the
quantization's rounding error but none from the merge. `merge_and_unload(requantize=True)` instead keeps
the layers quantized and stores the merged weights in their format again (lossy: up to half a
quantization step per weight on top of the update).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lorakit.quant.weights import dequantize_weight, is_quantized


def has_quantized_layers(model: nn.Module) -> bool:
    """True if any linear layer of `model` (adapter base layers included) holds bitsandbytes codes."""
    return any(is_quantized(module) for module in model.modules())


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's activations have: that of its input embeddings (float32 after
    `prepare_for_kbit_training`), else float32. Dequantized layers take it so their inputs match."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if weight is not None and weight.dtype.is_floating_point else torch.float32


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized linear layer by an `nn.Linear` of `dtype` (default `float_dtype(model)`)
    with its dequantized weight, and drop the model's quantization config; in place, returns `model`.

    Memory grows to that of a float model (e.g. ~4x for 8-bit → float32). Layers wrapped by LoRA layers
    are replaced too (as their `base_layer`), so adapters keep working on top.
    """
    dtype = dtype or float_dtype(model)
    for layer in _dequantize_layers(model):
        layer.to(dtype)
    _drop_quantization_config(model)
    return model


@contextmanager
def dequantized_for_merge(model: nn.Module) -> Iterator[None]:
    """Within the block the quantized layers are float32 `nn.Linear`s (exact dequantized weights); on
    leaving, they are cast once to `float_dtype(model)` and the model stops being a quantized model.

    Warns (one line) that the merged model is now a float model carrying the quantization's rounding.
    """
    dtype = float_dtype(model)
    layers = _dequantize_layers(model)
    try:
        yield
    finally:
        # Also after a failed merge: the model must not be left half float32, half `dtype`.
        for layer in layers:
            layer.to(dtype)
        _drop_quantization_config(model)
    warnings.warn(
        f"merge_and_unload: the base model was quantized (bitsandbytes); it is now a "
        f"{str(dtype).removeprefix('torch.')} "
        "model holding the dequantized weights plus the adapters (merged in float32), so it keeps the "
        "quantization's "
        "rounding error and takes float memory; pass requantize=True to keep it quantized",
        stacklevel=4,
    )


def _dequantize_layers(model: nn.Module) -> list[nn.Linear]:
    """Swap each quantized layer for a float32 `nn.Linear` holding its exact values; returns the new
    layers."""
    replaced = []
    for name, module in list(model.named_modules()):
        if not is_quantized(module):
            continue
        weight = dequantize_weight(module)
        bias = module.bias
        layer = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().float(), requires_grad=bias.requires_grad)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        replaced.append(layer)
    return replaced


def _drop_quantization_config(model: nn.Module) -> None:
    """Make the model an ordinary float model to transformers: no quantizer, no quantization_config in the
    config (so save_pretrained writes a float checkpoint that reloads without bitsandbytes)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit"):
        if flag in vars(model):
            delattr(model, flag)
