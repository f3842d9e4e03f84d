"""Fully trained copies of whole modules (`modules_to_save`, e.g. a new classification head).

The wrapper keeps the frozen `original_module` and one trainable copy per adapter in `modules_to_save`
(PEFT's names, so `lm_head.modules_to_save.default.weight` is what optimizers and state dicts see).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from lorakit.layers.rows import row_groups, rows_for_batch
from lorakit.layers.tuner_api import TunerLayerAPI

# Containers have no forward of their own (their parent indexes them), so there is nothing to switch: PEFT
# refuses them with a TypeError, and so do we. Name their trainable children instead.
_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """Rows of the first tensor argument, positional or keyword (a vision tower called as
    `tower(pixel_values=...)` has no positional one)."""
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)
    return first.shape[0] if first is not None and first.dim() > 0 else None


def _take_rows(value: Any, index: Tensor) -> Any:
    return value.index_select(0, index) if isinstance(value, Tensor) and value.dim() > 0 else value


def _put_rows(result: Any, index: Tensor, sub: Any) -> Any:
    """`result` with rows `index` replaced by `sub`'s, through tuples/lists (modules returning several
    tensors, e.g. (hidden, attention))."""
    if isinstance(result, Tensor):
        return result.index_copy(0, index, sub.to(result.dtype))
    if isinstance(result, (tuple, list)):
        return type(result)(_put_rows(r, index, s) for r, s in zip(result, sub))
    return result


class ModulesToSaveWrapper(TunerLayerAPI, nn.Module):
    def __init__(self, module: nn.Module, module_name: str = "") -> None:
        if isinstance(module, _CONTAINERS):
            raise TypeError(f"modules_to_save cannot be applied to modules of type {type(module)} "
                            f"({module_name}); name the modules inside it instead")
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.module_name = module_name
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"{self.module_name}: adapter {name!r} already exists")
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    @property
    def _adapters(self) -> set[str]:
        """PEFT's name for the set of adapters this wrapper has a copy for."""
        return set(self.adapter_names())

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter is not None else []

    def set_active(self, names: Sequence[str]) -> None:
        present = [n for n in names if n in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(
                f"{self.module_name}: only one adapter's modules_to_save can be active, got {present}"
            )
        self.active_adapter = present[0] if present else None

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if name in self.modules_to_save:
            yield from self.modules_to_save[name].parameters()

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        return (
            dict(self.modules_to_save[name].state_dict(keep_vars=True))
            if name in self.modules_to_save
            else {}
        )

    def current_module(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        rows = None
        if self.modules_to_save and not self.disabled:
            size = _batch_size(args, kwargs)
            rows = rows_for_batch(size) if size is not None else None
        if rows is None:
            return self.current_module()(*args, **kwargs)
        result = self.original_module(*args, **kwargs)
        device = next(v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)).device
        for name, index in row_groups(rows, device):
            if name in self.modules_to_save:
                sub = self.modules_to_save[name](*(_take_rows(a, index) for a in args),
                                                 **{k: _take_rows(v, index) for k, v in kwargs.items()})
                result = _put_rows(result, index, sub)
        return result

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self.active_adapter}"
