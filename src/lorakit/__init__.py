"""lorakit: LoRA fine-tuning for PyTorch and transformers, with PEFT's API and on-disk format.

    from lorakit import LoraConfig, get_peft_model, PeftModel
"""

from __future__ import annotations

import warnings

from torch import nn

from lorakit.auto import AutoModelForCausalLM, AutoPeftModelForCausalLM
from lorakit.config import LoraConfig, PeftType, TaskType
from lorakit.errors import (
    AdapterFileError,
    AdapterShapeError,
    DataError,
    LorakitError,
    MissingDependencyError,
)
from lorakit.layers import BASE_ROW
from lorakit.lora_model import LoraModel
from lorakit.model import PeftModel, PeftModelForCausalLM
from lorakit.models.default import default_model_path
from lorakit.quant import prepare_for_kbit_training, prepare_model_for_kbit_training
from lorakit.state_dict import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from lorakit.warnings import PeftError, PeftWarning

__version__ = "0.1.0"


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   mixed: bool = False, autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False,
                   **kwargs) -> PeftModel:
    """Add a new, trainable LoRA adapter to `model` (in place) and return it wrapped in a PeftModel.

    autocast_adapter_dtype: keep adapter weights in float32 over float16/bfloat16 bases (default), or
    use the base layer's dtype (False). mixed: PEFT's switch for mixing adapter types; lorakit has LoRA
    only, so a PeftModel serves both. low_cpu_mem_usage: start the factors at zero (weights about to be
    loaded).
    """
    if kwargs:
        warnings.warn(f"get_peft_model: ignoring unsupported argument(s) {sorted(kwargs)}", stacklevel=2)
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                     low_cpu_mem_usage=low_cpu_mem_usage)


__all__ = [
    "AdapterFileError", "AdapterShapeError", "AutoModelForCausalLM", "AutoPeftModelForCausalLM", "BASE_ROW",
    "DataError", "LoraConfig", "LoraModel", "LorakitError", "MissingDependencyError", "PeftError",
    "PeftModel",
    "PeftModelForCausalLM", "PeftType", "PeftWarning", "TaskType", "default_model_path", "get_peft_model",
    "get_base_model_state_dict", "get_peft_model_state_dict", "inject_adapter_in_model",
    "set_base_model_state_dict", "prepare_for_kbit_training",
    "prepare_model_for_kbit_training", "set_peft_model_state_dict",
]
