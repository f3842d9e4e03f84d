"""Quantized base models: bitsandbytes 8-bit (LLM.int8()) and 4-bit NF4/FP4 (QLoRA).

LoRA layers wrap bitsandbytes' `Linear8bitLt` / `Linear4bit` like any `nn.Linear` (they subclass it): the
base layer runs its own quantized matmul, the adapters run in float32 (or, with
`autocast_adapter_dtype=False`, in a 4-bit layer's compute dtype) and the update is added in that dtype.
Everything that needs the base weight as numbers (merging, DoRA's weight norm, OLoRA/PiSSA init) reads it
dequantized through `LoraLayer.base_weight()`, and writes go back quantized (`requantize_weight_`).

- `quantization_config(load_in_8bit=..., load_in_4bit=...)`: the `BitsAndBytesConfig` to load with;
- `prepare_for_kbit_training(model, gradient_checkpointing=...)`: freeze, upcast norms, checkpointing;
- `PeftModel.merge_and_unload()`: a dequantized float model (warns); `requantize=True` keeps it quantized;
- `merge_adapter()` / `unmerge_adapter()`: in place, re-quantizing each time (lossy, warns once);
- `dequantize_model(model)`: any quantized model (with or without adapters) as a float model.
"""

from lorakit.quant.config import (
    default_compute_dtype,
    prepare_for_kbit_training,
    prepare_model_for_kbit_training,
    quantization_config,
    require_bitsandbytes,
)
from lorakit.quant.dequant import dequantize_model, dequantized_for_merge, float_dtype, has_quantized_layers
from lorakit.quant.weights import (
    compute_dtype,
    dequantize_weight,
    is_quantized,
    is_quantized_param,
    requantize_weight_,
    restore_trainable_4bit_,
)

__all__ = [
    "compute_dtype",
    "default_compute_dtype",
    "dequantize_model",
    "dequantize_weight",
    "dequantized_for_merge",
    "float_dtype",
    "has_quantized_layers",
    "is_quantized",
    "is_quantized_param",
    "prepare_for_kbit_training",
    "prepare_model_for_kbit_training",
    "quantization_config",
    "require_bitsandbytes",
    "requantize_weight_",
    "restore_trainable_4bit_",
]
