"""`PeftModel`: a transformers model with named LoRA adapters, PEFT's API without PEFT.

Layout mirrors PEFT's so that state-dict keys match it: `PeftModel.base_model` is a thin `LoraModel`
whose `.model` is the user's transformers model, adapted in place (its targeted submodules swapped for
LoRA layers). That model stays a normal transformers model: `get_base_model()` returns it, its
`generate` and `save_pretrained` work, and `merge_and_unload()` hands it back without adapter layers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit import quant
from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError
from lorakit.inject import adapter_modules, inject_adapter, remove_adapter_modules
from lorakit.io import peft_format
from lorakit.io.portable import portable_adapter
from lorakit.layers import LoraLayer, ModulesToSaveWrapper, row_adapters

_ADAPTER_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def check_adapter_name(name: str) -> str:
    """Adapter names become sub-folder names on save: refuse separators, '..' and odd characters."""
    if not isinstance(name, str) or not name or name in (".", "..") or not set(name) <= _ADAPTER_NAME_CHARS:
        raise ValueError(f"adapter name {name!r}: use letters, digits, '_', '-' or '.' (it becomes a folder name)")
    return name


class LoraModel(nn.Module):
    """Container giving PEFT's `base_model.model.` prefix to parameter names."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class PeftModel(nn.Module):
    """A model carrying one or more LoRA adapters by name (PEFT-compatible API).

    Only adapter parameters (and, per config, biases and modules_to_save copies) are trainable; the base
    weights are frozen. `forward`/`generate` accept `adapter_names=[...]` to give each batch row its own
    adapter ("__base__" for none).
    """

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        self._setup(model, autocast_adapter_dtype)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name, inference_mode=peft_config.inference_mode)

    def _setup(self, model: nn.Module, autocast_adapter_dtype: bool) -> None:
        self.base_model = LoraModel(model)
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapters: list[str] = []
        self.autocast_adapter_dtype = autocast_adapter_dtype
        for param in model.parameters():
            param.requires_grad_(False)

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
        with self._rows(adapter_names):
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        with self._rows(adapter_names):
            return self.get_base_model().generate(*args, **kwargs)

    @contextmanager
    def _rows(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {"__base__"})
        if unknown:
            raise ValueError(f"adapter_names: unknown adapter(s) {unknown}; loaded: {sorted(self.peft_config)}")
        with row_adapters(list(adapter_names)):
            yield

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        model = self.get_base_model()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        # With a frozen embedding no checkpointed segment's input requires grad, so no gradient would reach
        # the adapters; make the embedding output require grad.
        model.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        self.get_base_model().gradient_checkpointing_disable()

    def enable_input_require_grads(self) -> None:
        self.get_base_model().enable_input_require_grads()

    def get_input_embeddings(self) -> nn.Module:
        return self.get_base_model().get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.get_base_model().get_output_embeddings()

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)

    # ---- adapters by name -------------------------------------------------------------------------

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapter]

    def _adapter_modules(self):
        return adapter_modules(self.get_base_model())

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    _for_loading: bool = False) -> None:
        """Inject a new adapter; it is not activated (call `set_adapter`), except as the first one."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
        if peft_config.bias != "none":
            others = [n for n, c in self.peft_config.items() if c.bias != "none"]
            if others:
                # The base biases are shared: two adapters training (and saving) them would overwrite each other.
                raise ValueError(f"adapter {adapter_name!r}: bias={peft_config.bias!r}, but adapter {others[0]!r} already "
                                 "trains the base biases; only one adapter may use bias other than 'none' (as in PEFT)")
        self.peft_config[adapter_name] = peft_config
        try:
            inject_adapter(self.get_base_model(), peft_config, adapter_name,
                           autocast_adapter_dtype=self.autocast_adapter_dtype, for_loading=_for_loading)
        except Exception:
            self._drop(adapter_name)
            raise
        # A new adapter starts frozen (PEFT: adding an adapter never changes what trains); `set_adapter` or
        # `load_adapter(is_trainable=True)` makes it trainable.
        self.set_requires_grad(adapter_name, False)
        self._apply_active()

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make `adapter_name` the active adapter; it becomes trainable unless `inference_mode`."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found; loaded: {sorted(self.peft_config)}")
        self.active_adapters = [adapter_name]
        trainable = None if inference_mode else adapter_name
        # One pass over the adapter modules: switching is meant to be cheap with many adapters loaded.
        for _, module in self._adapter_modules():
            module.set_active(self.active_adapters)
            for name in module.adapter_names():
                for param in module.adapter_parameters(name):
                    param.requires_grad_(name == trainable)
        # Base biases trained by an adapter (bias="all"/"lora_only") train while that adapter is the active,
        # trainable one. (PEFT instead decides once, when the first adapter is injected.)
        for name, config in self.peft_config.items():
            if config.bias != "none":
                trainable = name == adapter_name and not inference_mode
                for tensor in peft_format.bias_tensors(self.get_base_model(), config, name).values():
                    tensor.requires_grad_(trainable)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients on or off for the given adapters' own parameters (LoRA factors, DoRA magnitudes,
        modules_to_save copies); base biases are left alone, as in PEFT."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"adapter {name!r} not found; loaded: {sorted(self.peft_config)}")
            for _, module in self._adapter_modules():
                for param in module.adapter_parameters(name):
                    param.requires_grad_(requires_grad)

    def _apply_active(self) -> None:
        for _, module in self._adapter_modules():
            module.set_active(self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an (unmerged) adapter. If it was active, the first remaining adapter by name becomes active
        (and trainable), as in PEFT."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found; loaded: {sorted(self.peft_config)}")
        merged = [name for name, m in self._adapter_modules() if isinstance(m, LoraLayer) and adapter_name in m.merged_adapters]
        if merged:
            raise ValueError(f"adapter {adapter_name!r} is merged (e.g. into {merged[0]}); unmerge_adapter() before deleting it")
        # Layers left without adapters stay LoRA layers, as in PEFT, so parameter names do not change.
        self._drop(adapter_name, unwrap_empty=False)
        if adapter_name in self.active_adapters:
            remaining = [n for n in self.active_adapters if n != adapter_name] or sorted(self.peft_config)[:1]
            if remaining:
                # PEFT activates the first remaining adapter by sorted name, the way set_adapter does (trainable).
                self.set_adapter(remaining[0])
                return
            self.active_adapters = []
        self._apply_active()

    def _drop(self, adapter_name: str, unwrap_empty: bool = True) -> None:
        """Remove an adapter everywhere; with `unwrap_empty` (rolling back a failed add), layers left with
        no adapter at all go back to being their original module."""
        self.peft_config.pop(adapter_name, None)
        for _, module in list(self._adapter_modules()):
            module.delete_adapter(adapter_name)
        empty = [(n, m) for n, m in self._adapter_modules() if not m.adapter_names()] if unwrap_empty else []
        if empty:
            model = self.get_base_model()
            for name, module in empty:
                original = module.base_layer if isinstance(module, LoraLayer) else module.original_module
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, original)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model: inside the block every adapter is off (merged ones are unmerged first and
        merged back after)."""
        merged = {name: list(m.merged_adapters) for name, m in self._adapter_modules() if isinstance(m, LoraLayer) and m.merged}
        modules = [m for _, m in self._adapter_modules()]
        for module in modules:
            if isinstance(module, LoraLayer) and module.merged:
                module.unmerge()
            module.set_disabled(True)
        try:
            yield
        finally:
            for name, module in self._adapter_modules():
                module.set_disabled(False)
                if name in merged:
                    module.merge(merged[name])

    # ---- loading ------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        torch_dtype: torch.dtype | None = None, autocast_adapter_dtype: bool = True,
                        subfolder: str | None = None, **kwargs: Any) -> PeftModel:
        """Load a saved adapter (lorakit's or PEFT's) onto `model` and activate it."""
        _warn_unused(kwargs, "PeftModel.from_pretrained")
        directory = peft_format.adapter_directory(model_id, subfolder)
        config = config or LoraConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        saved = peft_format.read_adapter_weights(directory)
        peft_model = cls.__new__(cls)
        nn.Module.__init__(peft_model)
        peft_model._setup(model, autocast_adapter_dtype)
        peft_model._load(directory, adapter_name, config, saved, torch_dtype)
        peft_model.set_adapter(adapter_name, inference_mode=not is_trainable)
        if not is_trainable:
            # Loaded for inference: dropout off (the new LoRA dropout modules start in training mode), as PEFT.
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_dtype: torch.dtype | None = None, subfolder: str | None = None, **kwargs: Any) -> None:
        """Load another saved adapter under `adapter_name` without activating it."""
        _warn_unused(kwargs, "load_adapter")
        directory = peft_format.adapter_directory(model_id, subfolder)
        config = LoraConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        saved = peft_format.read_adapter_weights(directory)
        self._load(directory, adapter_name, config, saved, torch_dtype)
        # As in PEFT: the adapter is not activated, but is_trainable makes its parameters trainable anyway;
        # loading for inference puts the whole model in eval mode.
        self.set_requires_grad(adapter_name, is_trainable)
        if not is_trainable:
            self.eval()

    def _load(self, directory: Path, adapter_name: str, config: LoraConfig, saved: dict,
              torch_dtype: torch.dtype | None) -> None:
        source = str(directory / peft_format.WEIGHTS_NAME)
        try:
            self.add_adapter(adapter_name, config, _for_loading=True)
        except ValueError as err:
            raise AdapterFileError(f"{directory}: adapter does not fit this {type(self.get_base_model()).__name__}: {err}") from None
        try:
            if torch_dtype is not None:
                for _, module in self._adapter_modules():
                    for param in module.adapter_parameters(adapter_name):
                        param.data = param.data.to(torch_dtype)
            peft_format.load_adapter_tensors(self.get_base_model(), config, adapter_name, saved, source)
        except Exception:
            # Roll back completely: the layers this adapter wrapped go back to their original modules.
            self._drop(adapter_name)
            raise

    # ---- saving -------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: Sequence[str] | None = None, save_embedding_layers: bool | str = "auto",
                        is_main_process: bool = True, portable: bool = True, **kwargs: Any) -> None:
        """Write each adapter in PEFT's format: "default" into `save_directory`, others into sub-folders.

        portable: an adapter whose init moved the base weight (OLoRA, PiSSA) is saved so that it applies
        to the untouched base (see `lorakit.io.portable`); False keeps the raw form, for resuming training:
        loading it re-runs the init on the fresh base, which for "pissa_niter_N" (a randomized SVD) gives the
        same residual only when torch is seeded as it was at init.
        """
        _warn_unused(kwargs, "save_pretrained")
        if not safe_serialization:
            warnings.warn("lorakit only writes safetensors; safe_serialization=False is ignored", stacklevel=2)
        if not is_main_process:
            return
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        unknown = sorted(set(names) - set(self.peft_config))
        if unknown:
            raise ValueError(f"selected_adapters: unknown adapter(s) {unknown}; loaded: {sorted(self.peft_config)}")
        root = Path(save_directory)
        if root.exists() and not root.is_dir():
            raise FileExistsError(f"{root}: exists and is not a directory")
        for name in names:
            config = self.peft_config[name]
            tensors = peft_format.adapter_tensors(self.get_base_model(), config, name, save_embedding_layers)
            if portable:
                config, tensors = portable_adapter(self.get_base_model(), name, config, tensors)
            saved_config = LoraConfig(**{**config.__dict__, "inference_mode": True})
            directory = root if name == "default" else root / check_adapter_name(name)
            peft_format.save_adapter_files(directory, saved_config, tensors)

    # ---- merging ------------------------------------------------------------------------------------

    def _lora_layers(self) -> list[LoraLayer]:
        return [m for _, m in self._adapter_modules() if isinstance(m, LoraLayer)]

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Add the (active, or named) adapters into the base weights; layers stay and can unmerge.

        With `safe_merge`, a layer whose merged weight would hold NaN/inf raises ValueError naming it, and
        the layers already merged by this call are restored, so the model is left as it was.
        """
        names = adapter_names if adapter_names is not None else self.active_adapters
        self._untie_merged_weights([layer for layer in self._lora_layers()
                                    if any(n in layer.r and n not in layer.merged_adapters for n in names)])
        done: list[tuple[LoraLayer, list[str]]] = []
        try:
            for layer in self._lora_layers():
                before = list(layer.merged_adapters)
                layer.merge(names, safe_merge)
                if layer.merged_adapters != before:
                    done.append((layer, before))
        except Exception:
            for layer, before in reversed(done):
                layer.unmerge()
                layer.merge(before)
            raise

    def _untie_merged_weights(self, layers: list[LoraLayer]) -> None:
        """Give modules that share a to-be-merged weight (tied embeddings: GPT-2's wte and lm_head) their own
        copy first. Merging into the shared tensor would also add the update to the module that the adapter
        does not adapt, so the merged model would no longer compute what the adapter model computes (PEFT
        0.21 merges into the shared tensor). The config then says the weights are no longer tied, so the
        merged model saves both and reloads with the same outputs."""
        if not layers:
            return
        model = self.get_base_model()
        owners: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in model.modules():
            for attr, param in module._parameters.items():
                if param is not None:
                    owners.setdefault(id(param), []).append((module, attr))
        untied = False
        for layer in layers:
            for module, attr in owners.get(id(layer.weight), []):
                if module is not layer.base_layer:
                    setattr(module, attr, nn.Parameter(layer.weight.detach().clone(), requires_grad=False))
                    untied = True
        config = getattr(model, "config", None)
        if untied and config is not None:
            for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: config)())}.values():
                if getattr(cfg, "tie_word_embeddings", False):
                    cfg.tie_word_embeddings = False

    def unmerge_adapter(self) -> None:
        for layer in self._lora_layers():
            layer.unmerge()

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
        for _, module in self._adapter_modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.set_disabled(False)
        remove_adapter_modules(model, keep_saved_copy)
        self.peft_config = {}
        self.active_adapters = []
        return model

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                             svd_full_matrices: bool = True, svd_driver: str | None = None, **kwargs: Any) -> None:
        """Create `adapter_name` as a weighted combination of existing adapters ("linear", "cat" or "svd")."""
        from lorakit.merge.weighted import add_weighted_adapter

        _warn_unused(kwargs, "add_weighted_adapter")
        add_weighted_adapter(self, list(adapters), list(weights), adapter_name, combination_type,
                             svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver)

    # ---- counting -----------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; 4-bit packed weights count their unpacked size, as PEFT does."""
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
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def _warn_unused(kwargs: dict[str, Any], where: str) -> None:
    if kwargs:
        warnings.warn(f"{where}: ignoring unsupported argument(s) {sorted(kwargs)}", stacklevel=3)


PeftModelForCausalLM = PeftModel
