"""`add_weighted_adapter`: a new adapter from a weighted combination of existing ones (PEFT's numerics).

- "linear": A = Σ sign·√|wᵢsᵢ| Aᵢ, B = Σ √|wᵢsᵢ| Bᵢ (same rank required). Note this is not Σ wᵢΔWᵢ:
  the product has cross terms; it is what PEFT computes, so results match theirs.
- "cat": A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁, B₂, …]; exactly Σ wᵢ ΔWᵢ with rank Σ rᵢ.
- "svd": ΔW = Σ wᵢ ΔWᵢ truncated to rank `svd_rank` (default max rᵢ) by SVD: B = U_r diag(S_r), A = V_rᵀ,
  optionally clamped at the `svd_clamp` quantile of their entries.
The new adapter has lora_alpha = r, so its scaling is 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lorakit.layers import LoraLayer

if TYPE_CHECKING:
    from lorakit.model import PeftModel

COMBINATIONS = ("linear", "cat", "svd")


def add_weighted_adapter(model: PeftModel, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str, svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None) -> None:
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type: expected one of {', '.join(COMBINATIONS)}, got {combination_type!r}")
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights")
    configs = []
    for name in adapters:
        if name not in model.peft_config:
            raise ValueError(f"add_weighted_adapter: adapter {name!r} not found; loaded: {sorted(model.peft_config)}")
        config = model.peft_config[name]
        if config.use_dora:
            raise ValueError(f"add_weighted_adapter: adapter {name!r} uses DoRA, which cannot be combined linearly")
        if (config.rank_pattern or config.alpha_pattern) and combination_type != "svd":
            raise ValueError(f"add_weighted_adapter: adapter {name!r} has rank/alpha patterns; use combination_type='svd'")
        configs.append(config)
    ranks = [c.r for c in configs]
    if combination_type == "linear" and len(set(ranks)) > 1:
        raise ValueError(f"add_weighted_adapter: 'linear' needs equal ranks, got {dict(zip(adapters, ranks))}")
    new_rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[combination_type]
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, str) for t in targets):
        new_targets = "|".join(f"({t})" for t in targets)
    elif any(isinstance(t, str) for t in targets):
        raise ValueError("add_weighted_adapter: cannot combine adapters whose target_modules mix lists and regexes")
    else:
        new_targets = sorted(set().union(*targets))
    new_config = dataclasses.replace(
        configs[0], r=new_rank, lora_alpha=new_rank, target_modules=new_targets, rank_pattern={}, alpha_pattern={},
        init_lora_weights=True, use_rslora=False, modules_to_save=None, layers_to_transform=None, layers_pattern=None,
    )
    model.add_adapter(adapter_name, new_config, _for_loading=True)
    with torch.no_grad():
        for layer in model._lora_layers():
            if adapter_name not in layer.r:
                continue
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
            new_a, new_b = layer.factors(adapter_name)
            if not present:
                new_a.zero_()
                new_b.zero_()
                continue
            if combination_type == "linear":
                a, b = _linear(layer, present)
            elif combination_type == "cat":
                a, b = _cat(layer, present, new_rank)
            else:
                a, b = _svd(layer, present, new_rank, svd_clamp, svd_full_matrices, svd_driver)
            new_a.copy_(a)
            new_b.copy_(b)


def _linear(layer: LoraLayer, present: list[tuple[str, float]]) -> tuple[Tensor, Tensor]:
    a_sum = b_sum = 0
    for name, weight in present:
        a, b = (t.detach().float() for t in layer.factors(name))
        ws = weight * layer.scaling[name]
        root = math.sqrt(abs(ws))
        a_sum = a_sum + math.copysign(root, ws) * a
        b_sum = b_sum + root * b
    return a_sum, b_sum


def _cat(layer: LoraLayer, present: list[tuple[str, float]], new_rank: int) -> tuple[Tensor, Tensor]:
    parts_a, parts_b = [], []
    for name, weight in present:
        a, b = (t.detach().float() for t in layer.factors(name))
        parts_a.append(a * (weight * layer.scaling[name]))
        parts_b.append(b)
    a, b = torch.cat(parts_a, 0), torch.cat(parts_b, 1)
    pad = new_rank - a.shape[0]
    return torch.nn.functional.pad(a, (0, 0, 0, pad)), torch.nn.functional.pad(b, (0, pad))


def _svd(layer: LoraLayer, present: list[tuple[str, float]], new_rank: int, clamp: float | None,
         full_matrices: bool, driver: str | None) -> tuple[Tensor, Tensor]:
    delta = 0
    for name, weight in present:
        a, b = (t.detach().float() for t in layer.factors(name))
        delta = delta + weight * layer.scaling[name] * (b @ a)
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u = u[:, :new_rank] * s[:new_rank]
    vh = vh[:new_rank]
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh, u
