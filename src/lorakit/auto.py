"""`AutoPeftModelForCausalLM`: load the base model an adapter names, then the adapter on top."""

from __future__ import annotations

import os
from typing import Any

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError
from lorakit.io.peft_format import adapter_directory
from lorakit.model import PeftModel


class AutoPeftModelForCausalLM:
    """`AutoPeftModelForCausalLM.from_pretrained(adapter_dir, **model_kwargs)` → PeftModel."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, subfolder: str | None = None, **kwargs: Any) -> PeftModel:
        from lorakit.models.sources import load_causal_lm

        directory = adapter_directory(pretrained_model_name_or_path, subfolder)
        config = LoraConfig.from_pretrained(directory)
        if not config.base_model_name_or_path:
            raise AdapterFileError(f"{directory}: adapter_config.json names no base_model_name_or_path; load the base yourself")
        model = load_causal_lm(config.base_model_name_or_path, **kwargs)
        return PeftModel.from_pretrained(model, directory, adapter_name=adapter_name, is_trainable=is_trainable)
