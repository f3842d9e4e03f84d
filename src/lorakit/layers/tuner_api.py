"""PEFT's tuner-layer API on lorakit's adapter layers (`BaseTunerLayer`'s names), for code written for PEFT
that walks `model.modules()` and talks to the layers directly.

`TunerLayerAPI` is mixed into `LoraLayer` and `ModulesToSaveWrapper`; it only renames what the layers do
already (`set_active`, `set_disabled`, `delta_weight`), so there is one implementation of each behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class TunerLayerAPI:
    """PEFT's layer-level names: `active_adapter(s)`, `disable_adapters`, `enable_adapters`, `set_adapter`,
    `get_base_layer`, `get_delta_weight`. The class it is mixed into
    provides `set_active`, `set_disabled`, `adapter_names`, `adapter_parameters` (and, for LoRA layers,
    `delta_weight`)."""

    @property
    def disable_adapters(self) -> bool:
        """Whether this layer's adapters are turned off (`enable_adapters(False)`, `disable_adapter()`)."""
        return bool(getattr(self, "disabled", False))

    def enable_adapters(self, enabled: bool) -> None:
        """Turn this layer's adapters on or off (PEFT's `BaseTunerLayer.enable_adapters`)."""
        self.set_disabled(not enabled)

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate the named adapter(s) on this layer only; they become trainable unless `inference_mode`,
        the others are frozen (as PEFT's layer-level `set_adapter`)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.set_active(names)
        for name in self.adapter_names():
            for param in self.adapter_parameters(name):
                param.requires_grad_(name in names and not inference_mode)

    def _all_available_adapter_names(self) -> list[str]:
        return self.adapter_names()

    def get_base_layer(self) -> nn.Module:
        """The wrapped original module."""
        base = getattr(self, "base_layer", None) or getattr(self, "original_module", None)
        return base.get_base_layer() if isinstance(base, TunerLayerAPI) else base

    def get_delta_weight(self, adapter: str) -> Tensor:
        """ΔW of `adapter` in the base weight's layout and dtype (PEFT's `get_delta_weight`)."""
        delta = self.delta_weight(adapter)
        return delta.to(self.get_base_layer().weight.dtype)
