"""`add_weighted_adapter`: a new adapter from a weighted combination of existing ones (PEFT's numerics).

Two steps around `PeftModel.add_adapter`: `weighted_config` checks the request and gives the new adapter's
config (rank by combination, lora_alpha = r so that its scaling is 1), and `write_weighted_factors` fills
the added adapter's factors on every layer with the combination (`lorakit.merge.combine`) of the adapters
that layer carries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.inject import adapter_modules, lora_layers
from lorakit.layers import ModulesToSaveWrapper
from lorakit.merge import combine

COMBINATIONS = ("linear", "cat", "svd")


def weighted_config(configs: Mapping[str, LoraConfig], adapters: Sequence[str], weights: Sequence[float],
                    combination_type: str, svd_rank: int | None = None) -> LoraConfig:
    """The config of the combination of `adapters` (names in `configs`); ValueError for a request that
    cannot be combined."""
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type: expected one of {', '.join(COMBINATIONS)}, "
                         f"got {combination_type!r}")
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights")
    for name in adapters:
        if name not in configs:
            raise ValueError(f"add_weighted_adapter: adapter {name!r} not found; loaded: {sorted(configs)}")
        config = configs[name]
        if config.use_dora:
            raise ValueError(f"add_weighted_adapter: adapter {name!r} uses DoRA, which cannot be combined "
                             "linearly")
        if (config.rank_pattern or config.alpha_pattern) and combination_type == "linear":
            raise ValueError(f"add_weighted_adapter: adapter {name!r} has rank/alpha patterns; "
                             "use combination_type='cat' or 'svd'")
    # Room for the largest rank an adapter has on any layer (rank patterns included); a layer whose ranks
    # sum to less is padded with zeros (combine.cat), as PEFT does.
    ranks = [max([configs[name].r, *configs[name].rank_pattern.values()]) for name in adapters]
    if combination_type == "linear" and len(set(ranks)) > 1:
        raise ValueError(f"add_weighted_adapter: 'linear' needs equal ranks, "
                         f"got {dict(zip(adapters, ranks))}")
    new_rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[combination_type]
    targets = [configs[name].target_modules for name in adapters]
    if all(isinstance(t, str) for t in targets):
        new_targets = "|".join(f"({t})" for t in targets)
    elif any(isinstance(t, str) for t in targets):
        raise ValueError("add_weighted_adapter: cannot combine adapters whose target_modules mix lists and "
                         "regexes")
    else:
        new_targets = sorted(set().union(*targets))
    saved = [m for name in adapters for m in configs[name].modules_to_save or []]
    return dataclasses.replace(
        configs[adapters[0]], r=new_rank, lora_alpha=new_rank, target_modules=new_targets, rank_pattern={},
        alpha_pattern={}, init_lora_weights=True, use_rslora=False,
        modules_to_save=list(dict.fromkeys(saved)) or None, layers_to_transform=None, layers_pattern=None,
    )


def check_modules_to_save(model: nn.Module, adapters: Sequence[str]) -> None:
    """ValueError if two of `adapters` have their own copy of the same module (modules_to_save): whole
    trained modules cannot be combined (PEFT refuses the same)."""
    shared = [name for name, module in adapter_modules(model) if isinstance(module, ModulesToSaveWrapper)
              and sum(a in module.adapter_names() for a in adapters) > 1]
    if shared:
        raise ValueError("Cannot add weighted adapters if they target the same module with modules_to_save, "
                         f"but found {len(shared)} such instance(s) (e.g. {shared[0]}).")


def copy_modules_to_save(model: nn.Module, adapter_name: str, adapters: Sequence[str]) -> None:
    """Give the combined adapter's copy of each modules_to_save module the weights of the one adapter among
    `adapters` that trained it. (PEFT 0.21 gives it a fresh copy of the base module instead, losing the
    trained weights.)"""
    for _, module in adapter_modules(model):
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.adapter_names():
            source = next((a for a in adapters if a in module.adapter_names()), None)
            if source is not None:
                copies = module.modules_to_save
                copies[adapter_name].load_state_dict(copies[source].state_dict())


def write_weighted_factors(model: nn.Module, adapter_name: str, adapters: Sequence[str],
                           weights: Sequence[float], combination_type: str, svd_clamp: float | None = None,
                           svd_full_matrices: bool = True, svd_driver: str | None = None) -> None:
    """Set adapter `adapter_name`'s factors (already added to `model`, the adapted transformers model) to the
    combination of `adapters`; a layer that carries none of them gets zero factors."""
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if adapter_name not in layer.r:
                continue
            new_a, new_b = layer.factors(adapter_name)
            terms = [(*(t.detach() for t in layer.factors(name)), weight * layer.scaling[name])
                     for name, weight in zip(adapters, weights) if name in layer.r]
            if not terms:
                new_a.zero_()
                new_b.zero_()
                continue
            if combination_type == "linear":
                a, b = combine.linear(terms)
            elif combination_type == "cat":
                a, b = combine.cat(terms, layer.r[adapter_name])
            else:
                a, b = combine.svd(terms, layer.r[adapter_name], svd_clamp, svd_full_matrices, svd_driver)
            new_a.copy_(a)
            new_b.copy_(b)
