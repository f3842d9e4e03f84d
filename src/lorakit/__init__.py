"""lorakit: LoRA fine-tuning for PyTorch and transformers, with PEFT's API and on-disk format.

    from lorakit import LoraConfig, get_peft_model, PeftModel
"""

from __future__ import annotations

from lorakit.auto import AutoModelForCausalLM, AutoPeftModelForCausalLM
from lorakit.config import LoraConfig, TaskType
from lorakit.errors import AdapterFileError, DataError, LorakitError, MissingDependencyError
from lorakit.layers import BASE_ROW
from lorakit.model import PeftModel, PeftModelForCausalLM, get_peft_model
from lorakit.models.default import default_model_path
from lorakit.quant import prepare_for_kbit_training, prepare_model_for_kbit_training

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError", "AutoModelForCausalLM", "AutoPeftModelForCausalLM", "BASE_ROW", "DataError", "LoraConfig", "LorakitError",
    "MissingDependencyError", "PeftModel", "PeftModelForCausalLM", "TaskType", "default_model_path", "get_peft_model",
    "prepare_for_kbit_training", "prepare_model_for_kbit_training",
]
