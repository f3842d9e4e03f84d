"""Fully trained copies of whole modules (`modules_to_save`, e.g. a new classification head).

The wrapper keeps the frozen `original_module` and one trainable copy per adapter in `modules_to_save`
(PEFT's names, so `lm_head.modules_to_save.default.weight` is what optimizers and state dicts see).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from lorakit.layers.rows import row_groups, rows_for_batch


class ModulesToSaveWrapper(nn.Module):
    def __init__(self, module: nn.Module, module_name: str = "") -> None:
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

    def set_active(self, names: Sequence[str]) -> None:
        present = [n for n in names if n in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(f"{self.module_name}: only one adapter's modules_to_save can be active, got {present}")
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
        return dict(self.modules_to_save[name].state_dict(keep_vars=True)) if name in self.modules_to_save else {}

    def current_module(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, x: Tensor, *args, **kwargs):
        rows = rows_for_batch(x.shape[0]) if self.modules_to_save and not self.disabled else None
        if rows is None:
            return self.current_module()(x, *args, **kwargs)
        result = self.original_module(x, *args, **kwargs)
        for name, index in row_groups(rows, x.device):
            if name in self.modules_to_save:
                sub = self.modules_to_save[name](x.index_select(0, index), *args, **kwargs)
                result = result.index_copy(0, index, sub)
        return result

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self.active_adapter}"
