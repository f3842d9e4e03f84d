"""What a saved adapter holds, as data (`lorakit inspect` renders it).

Per adapted module: kind, rank, alpha and scaling (rank/alpha patterns and rsLoRA applied), the shape of
its update and ‖ΔW‖_F = s · ‖B A‖_F, computed from two r × r matrices without forming B A.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorakit.merge.adapter_file import open_adapter


@dataclass(frozen=True)
class ModuleSummary:
    name: str
    kind: str
    r: int
    alpha: float
    scaling: float
    shape: tuple[int, int]
    parameters: int
    delta_norm: float
    dora: bool
    lora_bias: bool


@dataclass(frozen=True)
class SavedTensorSummary:
    """A whole tensor saved with the adapter: a modules_to_save copy or a base tensor (bias, embedding)."""

    name: str
    shape: tuple[int, ...]
    parameters: int
    modules_to_save: bool


@dataclass(frozen=True)
class AdapterSummary:
    directory: str
    file: str
    file_bytes: int
    base_model: str | None
    task_type: str | None
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    bias: str
    init_lora_weights: bool | str
    target_modules: list[str] | str | None
    modules_to_save: list[str] | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    dtypes: list[str]
    parameters: int
    modules: list[ModuleSummary]
    saved_tensors: list[SavedTensorSummary]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_adapter(path: str | Path) -> AdapterSummary:
    """Read an adapter directory (config + weights) and summarise it; AdapterFileError if unreadable."""
    with open_adapter(path) as adapter:
        config = adapter.config
        modules_found, saved = adapter.layout()
        modules = []
        for module in sorted(modules_found, key=lambda m: m.name):
            a, b = adapter.shapes[module.lora_A], adapter.shapes[module.lora_B]
            keys = [k for k in (module.lora_A, module.lora_B, module.magnitude, module.lora_bias) if k]
            modules.append(ModuleSummary(
                name=module.name, kind="embedding" if module.embedding else "linear", r=module.rank,
                alpha=config.alpha_for(module.name), scaling=adapter.scaling(module.name),
                shape=(a[1], b[0]) if module.embedding else (b[0], a[1]),
                parameters=sum(math.prod(adapter.shapes[k]) for k in keys),
                delta_norm=adapter.delta_norm(module),
                dora=module.magnitude is not None, lora_bias=module.lora_bias is not None,
            ))
        return AdapterSummary(
            directory=str(adapter.directory), file=adapter.file.name, file_bytes=adapter.size_bytes,
            base_model=config.base_model_name_or_path, task_type=config.task_type, r=config.r,
            lora_alpha=config.lora_alpha, use_rslora=config.use_rslora, use_dora=config.use_dora,
            bias=config.bias, init_lora_weights=config.init_lora_weights,
            target_modules=config.target_modules, modules_to_save=config.modules_to_save,
            rank_pattern=dict(config.rank_pattern), alpha_pattern=dict(config.alpha_pattern),
            dtypes=sorted({str(d).removeprefix("torch.") for d in adapter.dtypes.values()}),
            parameters=sum(math.prod(shape) for shape in adapter.shapes.values()),
            modules=modules,
            saved_tensors=[
                SavedTensorSummary(t.param, adapter.shapes[t.key], math.prod(adapter.shapes[t.key]),
                                   t.whole_module)
                for t in sorted(saved, key=lambda t: t.param)
            ],
        )
