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
from lorakit.inject import lora_layers
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
        if (config.rank_pattern or config.alpha_pattern) and combination_type != "svd":
            raise ValueError(f"add_weighted_adapter: adapter {name!r} has rank/alpha patterns; "
                             "use combination_type='svd'")
    ranks = [configs[name].r for name in adapters]
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
    return dataclasses.replace(
        configs[adapters[0]], r=new_rank, lora_alpha=new_rank, target_modules=new_targets, rank_pattern={},
        alpha_pattern={}, init_lora_weights=True, use_rslora=False, modules_to_save=None,
        layers_to_transform=None, layers_pattern=None,
    )


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
