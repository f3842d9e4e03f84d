"""Saving OLoRA/PiSSA adapters so that they apply to the untouched base model.

Those inits replace the base weight W by a residual W_res = W − s·B₀A₀ and train A, B from (A₀, B₀). On the
original W the same model is W + s·(BA − B₀A₀), a LoRA of twice the rank:

    A' = [A; A₀]   (2r × in),   B' = [B, −B₀]   (out × 2r),   r' = 2r,

with lora_alpha rescaled so that the scaling is unchanged (×2 for alpha/r; ×√2 under rsLoRA's alpha/√r,
Kalajdzievski 2023), in rank_pattern/alpha_pattern too. This is the conversion PEFT does with
`path_initial_model_for_weight_conversion` (described in PiSSA, Meng et al. 2024, arXiv:2404.02948), without
the user having to save the initial adapter first.
Layers whose base did not move (embeddings, which keep PEFT's zero-A init) get zero blocks, A' = [A; 0],
B' = [B, 0], so every layer has the doubled rank the config announces.

DoRA carries over as is: its magnitude m rescales the columns of W_res + s·BA = W + s·B'A', the same matrix,
so m / ‖W + s·B'A'‖_c · (W + s·B'A') is the trained layer. Biases (lora_bias, bias="all") are not moved by
the init and are saved unchanged.

The saved config says `init_lora_weights: true`, so any loader (PEFT, vLLM, lorakit) uses it as a plain
LoRA. lorakit keeps A₀, B₀ on each layer from the moment of init; the user never saves them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from lorakit.config import LoraConfig
from lorakit.inject import lora_layers
from lorakit.io.peft_keys import factor_names, saved_key
from lorakit.layers import LoraEmbedding


def portable_adapter(
    model: nn.Module, adapter_name: str, config: LoraConfig, tensors: dict[str, Tensor]
) -> tuple[LoraConfig, dict[str, Tensor]]:
    """The (config, tensors) to save for `adapter_name`; unchanged unless its init moved the base."""
    layers = [(n, m) for n, m in lora_layers(model) if adapter_name in m.r]
    if not any(adapter_name in m.initial_factors for _, m in layers):
        return config, tensors
    out = dict(tensors)
    for name, layer in layers:
        a_key, b_key = (saved_key(name, key) for key in factor_names(isinstance(layer, LoraEmbedding)))
        a, b = tensors[a_key].detach(), tensors[b_key].detach()
        a0, b0 = layer.initial_factors.get(adapter_name, (torch.zeros_like(a), torch.zeros_like(b)))
        out[a_key] = torch.cat([a, a0.to(a)], dim=0)
        out[b_key] = torch.cat([b, -b0.to(b)], dim=1)
    alpha_factor = math.sqrt(2) if config.use_rslora else 2
    portable = dataclasses.replace(
        config,
        r=2 * config.r,
        lora_alpha=alpha_factor * config.lora_alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: alpha_factor * v for k, v in config.alpha_pattern.items()},
        init_lora_weights=True,
    )
    return portable, out
