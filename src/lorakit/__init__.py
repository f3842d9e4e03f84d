"""lorakit: LoRA fine-tuning for PyTorch and transformers, with PEFT's API and on-disk format.

    from lorakit import LoraConfig, get_peft_model, PeftModel
"""

from __future__ import annotations

import warnings

from torch import nn

from lorakit.auto import AutoModelForCausalLM, AutoPeftModelForCausalLM
from lorakit.config import LoraConfig, TaskType
from lorakit.errors import AdapterFileError, DataError, LorakitError, MissingDependencyError
from lorakit.layers import BASE_ROW
from lorakit.model import PeftModel, PeftModelForCausalLM
from lorakit.models.default import default_model_path
from lorakit.quant import prepare_for_kbit_training, prepare_model_for_kbit_training

__version__ = "0.1.0"


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True, **kwargs) -> PeftModel:
    """Add a new, trainable LoRA adapter to `model` (in place) and return it wrapped in a PeftModel.

    autocast_adapter_dtype: keep adapter weights in float32 over float16/bfloat16 bases (default), or
    use the base layer's dtype (False).
    """
    if kwargs:
        warnings.warn(f"get_peft_model: ignoring unsupported argument(s) {sorted(kwargs)}", stacklevel=2)
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


__all__ = [
    "AdapterFileError", "AutoModelForCausalLM", "AutoPeftModelForCausalLM", "BASE_ROW", "DataError",
    "LoraConfig", "LorakitError", "MissingDependencyError", "PeftModel", "PeftModelForCausalLM", "TaskType",
    "default_model_path", "get_peft_model", "prepare_for_kbit_training", "prepare_model_for_kbit_training",
]
