"""`LoraModel`: the adapters of one transformers model, by name (PEFT's `PeftModel.base_model`).

It holds the adapted model as `.model` (so parameter names carry PEFT's `base_model.model.` prefix), the
configs by adapter name and which adapters are active. `PeftModel` delegates its adapter bookkeeping here,
as PEFT's `PeftModel` does to its tuner model; code written for PEFT reaches it as `peft_model.base_model`
(`peft_config`, `active_adapters`, `targeted_module_names`, `set_adapter([...])`...).

Attribute access: a `LoraModel` answers the named submodules of its model (`base_model.lin0`,
`base_model.transformer`) and nothing else by forwarding; see `submodule_attribute`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from lorakit import inject
from lorakit.config import LoraConfig
from lorakit.io import peft_format
from lorakit.io.pretrained import check_adapter_name
from lorakit.merge import live


def submodule_attribute(model: nn.Module, name: str) -> nn.Module:
    """`model`'s direct child module `name`, the one kind of attribute the wrappers forward; AttributeError
    otherwise (private names are never forwarded, so torch's own lookups are unaffected)."""
    modules = model.__dict__.get("_modules", {})
    if not name.startswith("_") and name in modules:
        return modules[name]
    raise AttributeError(f"{type(model).__name__!r} object has no attribute {name!r}")


class LoraModel(nn.Module):
    """A transformers model with named LoRA adapters injected in place (PEFT's `LoraModel`).

    `LoraModel(model, config, adapter_name)` injects a first adapter and activates it; `LoraModel(model)`
    starts with none (`add_adapter` then).
    """

    prefix = "lora_"

    def __init__(
        self,
        model: nn.Module,
        peft_config: LoraConfig | None = None,
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self._active: list[str] = []
        self.autocast_adapter_dtype = autocast_adapter_dtype
        # Adapter parameters frozen by disable_adapter_layers, made trainable again by enable_adapter_layers.
        self._frozen: list[nn.Parameter] = []
        self._disabled_depth = 0
        if peft_config is not None:
            self.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
            self.set_adapter(adapter_name, inference_mode=peft_config.inference_mode)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return submodule_attribute(self.__dict__["_modules"]["model"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # ---- which adapters ------------------------------------------------------------------------------

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name; a list when several are active (as PEFT's tuner model)."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def targeted_module_names(self) -> list[str]:
        """Names (in `model`) of the modules that carry LoRA layers."""
        return [name for name, _ in inject.lora_layers(self.model)]

    @property
    def modules_to_save(self) -> set[str] | None:
        names = {m for config in self.peft_config.values() for m in config.modules_to_save or []}
        return names or None

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: LoraConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool | None = None,
    ) -> None:
        """Inject a new adapter; it is not activated (call `set_adapter`), except as the first one.

        low_cpu_mem_usage: its weights are about to be loaded, so its factors start at zero, skipping the
        random init. autocast_adapter_dtype: keep its weights in float32 over a float16/bfloat16 base (None:
        what the model was created with). The adapter keeps a copy of `peft_config`.
        """
        check_adapter_name(adapter_name)
        config = inject.new_adapter_config(self.model, adapter_name, peft_config, self.peft_config)
        self.peft_config[adapter_name] = config
        autocast = self.autocast_adapter_dtype if autocast_adapter_dtype is None else autocast_adapter_dtype
        try:
            inject.inject_adapter(
                self.model,
                config,
                adapter_name,
                autocast_adapter_dtype=autocast,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
        except Exception:
            self.drop(adapter_name)
            raise
        # A new adapter starts frozen (PEFT: adding an adapter never changes what trains); `set_adapter` or
        # `load_adapter(is_trainable=True)` makes it trainable.
        self.set_requires_grad(adapter_name, False)
        self.apply_active()

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make the named adapter(s) active (their updates are summed) and trainable unless
        `inference_mode`; the others are frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} not found in {sorted(self.peft_config)}")
        self._active = names
        trainable = set() if inference_mode else set(names)
        # One pass over the adapter modules: switching is meant to be cheap with many adapters loaded.
        for _, module in inject.adapter_modules(self.model):
            module.set_active(self._active)
            for name in module.adapter_names():
                for param in module.adapter_parameters(name):
                    param.requires_grad_(name in trainable)
        # Base biases trained by an adapter (bias="all"/"lora_only") train while that adapter is active and
        # trainable. (PEFT instead decides once, when the first adapter is injected.)
        for name, config in self.peft_config.items():
            if config.bias != "none":
                for tensor in peft_format.bias_tensors(self.model, config, name).values():
                    tensor.requires_grad_(name in trainable)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients on or off for the given adapters' own parameters (LoRA factors, DoRA magnitudes,
        modules_to_save copies); base biases are left alone, as in PEFT."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} not found in {sorted(self.peft_config)}")
            for _, module in inject.adapter_modules(self.model):
                for param in module.adapter_parameters(name):
                    param.requires_grad_(requires_grad)

    def apply_active(self) -> None:
        """Tell every adapter module which adapters are active (after adding, loading or deleting one)."""
        for _, module in inject.adapter_modules(self.model):
            module.set_active(self._active)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an (unmerged) adapter. If it was active, the remaining active ones stay, or else the first
        remaining adapter by name becomes active (and trainable), as in PEFT."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if any(adapter_name in layer.merged_adapters for _, layer in inject.lora_layers(self.model)):
            raise ValueError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first."
            )
        was_active = adapter_name in self._active
        # Layers left without adapters stay LoRA layers, as in PEFT, so parameter names do not change.
        self.drop(adapter_name, unwrap_empty=False)
        if was_active:
            remaining = self._active or sorted(self.peft_config)[:1]
            if remaining:
                self.set_adapter(remaining)
                return
            self._active = []
        self.apply_active()

    def drop(self, adapter_name: str, unwrap_empty: bool = True) -> None:
        """Remove an adapter everywhere; with `unwrap_empty` (rolling back a failed add), layers left with
        no adapter at all go back to being their original module."""
        self.peft_config.pop(adapter_name, None)
        self._active = [n for n in self._active if n != adapter_name]
        inject.remove_adapter(self.model, adapter_name, unwrap_empty)

    def clear(self) -> None:
        """Forget every adapter (after the adapter modules were taken out of the model)."""
        self.peft_config = {}
        self._active = []

    # ---- on and off -----------------------------------------------------------------------------------

    def disable_adapter_layers(self) -> None:
        """Turn every adapter off, and its parameters frozen, until `enable_adapter_layers` (merged ones are
        unmerged first, with a warning, as in PEFT)."""
        if any(layer.merged for _, layer in inject.lora_layers(self.model)):
            warnings.warn("Unmerging merged adapters before disabling them", UserWarning, stacklevel=2)
            live.unmerge_adapters(self.model)
        self._frozen = self._frozen or self._freeze()
        for _, module in inject.adapter_modules(self.model):
            module.set_disabled(True)

    def enable_adapter_layers(self) -> None:
        for _, module in inject.adapter_modules(self.model):
            module.set_disabled(False)
        for param in self._frozen:
            param.requires_grad_(True)
        self._frozen = []

    def _freeze(self) -> list[nn.Parameter]:
        """Freeze every adapter parameter; returns those that were trainable."""
        params = [
            p
            for _, m in inject.adapter_modules(self.model)
            for n in m.adapter_names()
            for p in m.adapter_parameters(n)
        ]
        trainable = [p for p in params if p.requires_grad]
        for param in trainable:
            param.requires_grad_(False)
        return trainable

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base model inside the block, its adapter parameters frozen (as PEFT: a disabled adapter
        does not train); the on/off state and trainability are restored after, also when blocks nest."""
        modules = [module for _, module in inject.adapter_modules(self.model)]
        states = {id(m): getattr(m, "disabled", False) for m in modules}
        if len(set(states.values())) > 1:
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are "
                "disabled; after disable_adapter() all of them will be enabled",
                UserWarning,
                stacklevel=3,
            )
            states = dict.fromkeys(states, False)
        frozen = self._freeze()
        self._disabled_depth += 1
        try:
            with live.adapters_disabled(self.model):
                yield
        finally:
            self._disabled_depth -= 1
            for module in modules:
                module.set_disabled(states[id(module)])
            for param in frozen:
                param.requires_grad_(True)

    @property
    def has_active_enabled_adapter(self) -> bool:
        """False inside `disable_adapter()` while some adapter is active (PEFT's definition: layers turned
        off by `disable_adapter_layers` do not count)."""
        return self._disabled_depth == 0 or not self._active
