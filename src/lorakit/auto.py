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
            raise AdapterFileError(f"{directory}: adapter_config.json names no base_model_name_or_path; "
                                   "load the base yourself")
        model = load_causal_lm(config.base_model_name_or_path, **kwargs)
        return PeftModel.from_pretrained(model, directory, adapter_name=adapter_name,
                                         is_trainable=is_trainable)


class AutoModelForCausalLM:
    """Drop-in for `transformers.AutoModelForCausalLM.from_pretrained` that also understands

    * every lorakit model source: a `.gguf` file, or `None` / "default" for the embedded SmolLM2;
    * `load_in_8bit=True` / `load_in_4bit=True`, the shorthand transformers 5 removed (mapped to a
      `BitsAndBytesConfig`, as older transformers did);
    * `peft_config=LoraConfig(...)`: returns the model with that adapter added (`get_peft_model`),
      prepared for k-bit training when quantized — the one-liner of the LoRA guide lorakit follows.

    Everything else is passed to transformers unchanged.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None = None, *,
                        peft_config: LoraConfig | None = None, load_in_8bit: bool = False,
                        load_in_4bit: bool = False,
                        **kwargs: Any):
        from lorakit.models.sources import load_causal_lm

        quantized = load_in_8bit or load_in_4bit
        if quantized:
            if "quantization_config" in kwargs:
                raise ValueError("from_pretrained: pass either load_in_8bit/load_in_4bit or "
                                 "quantization_config, not both")
            from lorakit.quant import quantization_config

            kwargs["quantization_config"] = quantization_config(load_in_8bit=load_in_8bit,
                                                                load_in_4bit=load_in_4bit)
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype", "auto"))
        model = load_causal_lm(pretrained_model_name_or_path, **kwargs)
        if peft_config is None:
            return model
        if quantized or "quantization_config" in kwargs:
            from lorakit.quant import prepare_for_kbit_training

            prepare_for_kbit_training(model)
        return PeftModel(model, peft_config)
