"""`PeftModel`: a transformers model with named LoRA adapters, PEFT's API without PEFT.

Layout mirrors PEFT's so that state-dict keys match it: `PeftModel.base_model` is a thin `LoraModel`
whose `.model` is the user's transformers model, adapted in place (its targeted submodules swapped for
LoRA layers). That model stays a normal transformers model: `get_base_model()` returns it, its
`generate` and `save_pretrained` work, and `merge_and_unload()` hands it back without adapter layers.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit import inject, quant
from lorakit.checkpointing import disable_activation_checkpointing, enable_activation_checkpointing
from lorakit.config import LoraConfig
from lorakit.io import pretrained
from lorakit.io.model_card import write_model_card
from lorakit.io.pretrained import SavedAdapter
from lorakit.layers import BASE_ROW, row_adapters
from lorakit.lora_model import LoraModel, submodule_attribute
from lorakit.merge import live, weighted


class PeftModel(nn.Module):
    """A model carrying one or more LoRA adapters by name (PEFT-compatible API).

    Only adapter parameters (and, per config, biases and modules_to_save copies) are trainable; the base
    weights are frozen. `forward`/`generate` accept `adapter_names=[...]` to give each batch row its own
    adapter ("__base__" for none).
    """

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        """Wrap `model` (adapted in place) with a first adapter, active and trainable unless the config says
        inference_mode; a config naming no base model gets `model`'s name (in the adapter's copy)."""
        super().__init__()
        for param in model.parameters():
            param.requires_grad_(False)
        if peft_config.base_model_name_or_path is None:
            name = getattr(model, "name_or_path", None) or None
            peft_config = dataclasses.replace(peft_config, base_model_name_or_path=name)
        self.base_model = LoraModel(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                                    autocast_adapter_dtype=autocast_adapter_dtype)

    def __getattr__(self, name: str) -> Any:
        """Forwarded, and nothing else: `.model` (the transformers model, as in PEFT) and its named child
        modules (`peft_model.lin0`, `peft_model.transformer`)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__["_modules"]["base_model"]
            return base.model if name == "model" else submodule_attribute(base.model, name)

    # ---- the transformers model, explicitly forwarded ---------------------------------------------

    def get_base_model(self) -> nn.Module:
        """The adapted transformers model itself; hand this to transformers' Trainer or TRL (docs/trl.md)."""
        return self.base_model.model

    @property
    def config(self):
        return self.get_base_model().config

    @property
    def generation_config(self):
        return self.get_base_model().generation_config

    @property
    def device(self) -> torch.device:
        return self.get_base_model().device

    @property
    def dtype(self) -> torch.dtype:
        return self.get_base_model().dtype

    @property
    def name_or_path(self) -> str:
        return getattr(self.get_base_model(), "name_or_path", "")

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        with self._rows(adapter_names, args, kwargs):
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        with self._rows(adapter_names, args, kwargs):
            return self.get_base_model().generate(*args, **kwargs)

    def _rows(self, adapter_names: Sequence[str] | None, args: tuple,
              kwargs: dict) -> AbstractContextManager[None]:
        """One adapter per batch row; checked here, before the model runs, with PEFT's messages."""
        if adapter_names is None:
            return nullcontext()
        if self.training:
            # PEFT's rule for this argument; mixed batches with gradients stay available through
            # `lorakit.layers.row_adapters`.
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {BASE_ROW})
        if unknown:
            raise ValueError(f"adapter_names: unknown adapter(s) {unknown}; "
                             f"loaded: {sorted(self.peft_config)}")
        if any(layer.merged for _, layer in inject.lora_layers(self.get_base_model())):
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()), None)
        if first is not None and first.shape[0] != len(adapter_names):
            raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(adapter_names)} and {first.shape[0]} respectively.")
        return row_adapters(list(adapter_names))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        model = self.get_base_model()
        enable_activation_checkpointing(model, gradient_checkpointing_kwargs)
        # With a frozen embedding no checkpointed segment's input requires grad, so no gradient would reach
        # the adapters; make the embedding output require grad.
        model.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        disable_activation_checkpointing(self.get_base_model())

    def enable_input_require_grads(self) -> None:
        self.get_base_model().enable_input_require_grads()

    def get_input_embeddings(self) -> nn.Module:
        return self.get_base_model().get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.get_base_model().get_output_embeddings()

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)

    # ---- adapters by name (kept by `base_model`, lorakit.lora_model) -----------------------------------

    prefix = LoraModel.prefix
    # PEFT's flag for prompt-learning methods, read by code written for PEFT; LoRA is not one.
    _is_prompt_learning = False

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def modules_to_save(self) -> set[str] | None:
        return self.base_model.modules_to_save

    @property
    def has_active_enabled_adapter(self) -> bool:
        return self.base_model.has_active_enabled_adapter

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Inject a new adapter; it is not activated (call `set_adapter`). See `LoraModel.add_adapter`."""
        self.base_model.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage,
                                    autocast_adapter_dtype=autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make `adapter_name` the active adapter; it becomes trainable unless `inference_mode`. (Several at
        once: `base_model.set_adapter([...])`, as in PEFT.)"""
        if not isinstance(adapter_name, str):
            raise TypeError("PeftModel.set_adapter takes one adapter name; use base_model.set_adapter([...]) "
                            "to activate several")
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients on or off for the given adapters' own parameters (LoRA factors, DoRA magnitudes,
        modules_to_save copies); base biases are left alone, as in PEFT."""
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an (unmerged) adapter; see `LoraModel.delete_adapter`."""
        self.base_model.delete_adapter(adapter_name)

    def disable_adapter_layers(self) -> None:
        self.base_model.disable_adapter_layers()

    def enable_adapter_layers(self) -> None:
        self.base_model.enable_adapter_layers()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model: inside the block every adapter is off (merged ones are unmerged first and
        merged back after)."""
        with self.base_model.adapters_disabled():
            yield

    # ---- loading and saving (lorakit.io.pretrained) --------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        torch_dtype: torch.dtype | None = None, autocast_adapter_dtype: bool = True,
                        subfolder: str | None = None, **kwargs: Any) -> PeftModel:
        """Load a saved adapter (lorakit's or PEFT's) onto `model` and activate it."""
        _warn_unused(kwargs, "PeftModel.from_pretrained")
        saved = pretrained.read_saved_adapter(model_id, subfolder, config, is_trainable)
        try:
            peft_model = cls(model, saved.config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                             low_cpu_mem_usage=True)
        except ValueError as err:
            raise saved.misfit(model, err) from None
        peft_model._load_weights(adapter_name, saved, torch_dtype)
        if config is not None:
            # As PEFT: the model records the caller's config object itself, updated with what loading
            # resolved (inference_mode, concrete target modules, the base model's name).
            recorded = peft_model.peft_config[adapter_name]
            for field in dataclasses.fields(config):
                setattr(config, field.name, getattr(recorded, field.name))
            peft_model.peft_config[adapter_name] = config
        if not is_trainable:
            # Loaded for inference: dropout off (new LoRA dropout modules start in training mode), as PEFT.
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_dtype: torch.dtype | None = None, autocast_adapter_dtype: bool = True,
                     subfolder: str | None = None, low_cpu_mem_usage: bool = False,
                     **kwargs: Any) -> pretrained.LoadResult:
        """Load another saved adapter under `adapter_name` without activating it.

        Returns PEFT's load result: `missing_keys` and `unexpected_keys`, both empty, since a file with a
        tensor that has no place in the model, or lacking one, is refused (AdapterFileError) instead.
        low_cpu_mem_usage is accepted for PEFT's signature: loading always skips the random init.
        """
        _warn_unused(kwargs, "load_adapter")
        saved = pretrained.read_saved_adapter(model_id, subfolder, is_trainable=is_trainable)
        try:
            self.add_adapter(adapter_name, saved.config, low_cpu_mem_usage=True,
                             autocast_adapter_dtype=autocast_adapter_dtype)
        except ValueError as err:
            raise saved.misfit(self.get_base_model(), err) from None
        self._load_weights(adapter_name, saved, torch_dtype)
        # As in PEFT: the adapter is not activated, but is_trainable makes its parameters trainable anyway;
        # loading for inference puts the whole model in eval mode.
        self.set_requires_grad(adapter_name, is_trainable)
        if not is_trainable:
            self.eval()
        return pretrained.LoadResult([], [])

    def _load_weights(self, adapter_name: str, saved: SavedAdapter, torch_dtype: torch.dtype | None) -> None:
        try:
            pretrained.load_saved_weights(self.get_base_model(), adapter_name, self.peft_config[adapter_name],
                                          saved, torch_dtype)
        except Exception:
            # Roll back completely: the layers this adapter wrapped go back to their original modules.
            self.base_model.drop(adapter_name)
            raise
        # Layers keep state derived from their adapters (LoraLinear's inference plan holds their dtype, which
        # torch_dtype may just have changed); re-activating rebuilds it.
        self.base_model.apply_active()

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: Sequence[str] | None = None,
                        save_embedding_layers: bool | str = "auto", is_main_process: bool = True,
                        portable: bool = True, **kwargs: Any) -> None:
        """Write each adapter in PEFT's format: "default" into `save_directory`, others into sub-folders.

        portable: an adapter whose init moved the base weight (OLoRA, PiSSA) is saved so that it applies
        to the untouched base (see `lorakit.io.portable`); False keeps the raw form, for resuming training:
        loading it re-runs the init on the fresh base, which for "pissa_niter_N" (a randomized SVD) gives the
        same residual only when torch is seeded as it was at init.
        """
        _warn_unused(kwargs, "save_pretrained")
        if not safe_serialization:
            warnings.warn("lorakit only writes safetensors; safe_serialization=False is ignored",
                          stacklevel=2)
        if not is_main_process:
            return
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        unknown = sorted(set(names) - set(self.peft_config))
        if unknown:
            raise ValueError(f"selected_adapters: unknown adapter(s) {unknown}; "
                             f"loaded: {sorted(self.peft_config)}")
        configs = {name: self.peft_config[name] for name in names}
        pretrained.save_adapters(self.get_base_model(), configs, Path(save_directory), save_embedding_layers,
                                 portable)
        write_model_card(Path(save_directory), self.get_base_model(), configs)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        """Not offered: lorakit works without the Hugging Face Hub."""
        raise NotImplementedError("push_to_hub: lorakit does not upload; save_pretrained(dir) and upload dir "
                                  "with huggingface_hub's upload_folder")

    # ---- merging (lorakit.merge.live, lorakit.merge.weighted) -----------------------------------------

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Add the (active, or named) adapters into the base weights; layers stay and can unmerge.

        With `safe_merge`, a layer whose merged weight would hold NaN/inf raises ValueError naming it, and
        the layers already merged by this call are restored, so the model is left as it was.
        """
        names = adapter_names if adapter_names is not None else self.active_adapters
        layers = [layer for _, layer in inject.lora_layers(self.get_base_model())]
        merged = sorted({n for layer in layers for n in layer.merged_adapters})
        if layers and all(n in layer.merged_adapters for layer in layers for n in names if n in layer.r):
            warnings.warn("All adapters are already merged, nothing to do.", UserWarning, stacklevel=2)
            return
        if merged:
            warnings.warn(f"Already following adapters were merged {','.join(merged)}. You are now "
                          f"additionally merging {','.join(names)}.", UserWarning, stacklevel=2)
        live.merge_adapters(self.get_base_model(), names, safe_merge)

    def unmerge_adapter(self) -> None:
        live.unmerge_adapters(self.get_base_model())

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Sequence[str] | None = None, requantize: bool = False) -> nn.Module:
        """Merge the adapters into the base weights and return the plain transformers model.

        On a bitsandbytes-quantized base the updates are added in float32 to the dequantized weights and the
        model comes back as a float model (with a warning), or with `requantize=True` still quantized, its
        merged weights rounded to the quantized format (see `lorakit.quant.dequant`).
        """
        if requantize or not quant.has_quantized_layers(self.get_base_model()):
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        else:
            with quant.dequantized_for_merge(self.get_base_model()):
                self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unload(keep_saved_copy=True)

    def unload(self) -> nn.Module:
        """Remove every adapter (unmerging first) and return the original transformers model."""
        self.unmerge_adapter()
        return self._unload(keep_saved_copy=False)

    def _unload(self, keep_saved_copy: bool) -> nn.Module:
        model = self.get_base_model()
        inject.remove_adapter_modules(model, keep_saved_copy)
        self.base_model.clear()
        return model

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, **kwargs: Any) -> None:
        """Create `adapter_name` as a weighted combination of existing adapters ("linear", "cat" or "svd"; see
        `lorakit.merge.combine`). It is added, not activated."""
        _warn_unused(kwargs, "add_weighted_adapter")
        adapters, weights = list(adapters), list(weights)
        config = weighted.weighted_config(self.peft_config, adapters, weights, combination_type, svd_rank)
        weighted.check_modules_to_save(self.get_base_model(), adapters)
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=True)
        weighted.copy_modules_to_save(self.get_base_model(), adapter_name, adapters)
        weighted.write_weighted_factors(self.get_base_model(), adapter_name, adapters, weights,
                                        combination_type, svd_clamp=svd_clamp,
                                        svd_full_matrices=svd_full_matrices, svd_driver=svd_driver)

    # ---- counting -----------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; 4-bit packed weights count their unpacked size, as in
        PEFT."""
        trainable = total = 0
        for param in self.parameters():
            count = param.numel()
            if type(param).__name__ == "Params4bit":
                count *= 2 * (param.element_size() if hasattr(param, "element_size") else 1)
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")


PeftModelForCausalLM = PeftModel


def _warn_unused(kwargs: dict[str, Any], where: str) -> None:
    if kwargs:
        warnings.warn(f"{where}: ignoring unsupported argument(s) {sorted(kwargs)}", stacklevel=3)
