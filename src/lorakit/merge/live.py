"""Merging adapters into a live model's weights and out again (`PeftModel.merge_adapter`,
`unmerge_adapter`, `disable_adapter`). `model` is the adapted transformers model; each LoRA layer does its
own float32 maths (`LoraLayer.merge`), this module decides which layers and keeps the model consistent:
tied weights are untied first, and a failed safe merge leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lorakit.inject import adapter_modules, lora_layers
from lorakit.layers import LoraLayer


def merge_adapters(model: nn.Module, adapter_names: Sequence[str], safe_merge: bool = False) -> None:
    """Add the named adapters into the base weights; the layers stay and can unmerge.

    With `safe_merge`, a layer whose merged weight would hold NaN/inf raises ValueError naming it, and the
    layers already merged by this call are restored, so the model is left as it was.
    """
    layers = [layer for _, layer in lora_layers(model)]
    untie_weights(model, [layer for layer in layers
                          if any(n in layer.r and n not in layer.merged_adapters for n in adapter_names)])
    done: list[tuple[LoraLayer, list[str]]] = []
    try:
        for layer in layers:
            before = list(layer.merged_adapters)
            layer.merge(adapter_names, safe_merge)
            if layer.merged_adapters != before:
                done.append((layer, before))
    except Exception:
        for layer, before in reversed(done):
            layer.unmerge()
            layer.merge(before)
        raise


def unmerge_adapters(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights again."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def untie_weights(model: nn.Module, layers: Sequence[LoraLayer]) -> None:
    """Give modules that share a to-be-merged weight (tied embeddings: GPT-2's wte and lm_head) their own
    copy first. Merging into the shared tensor would also add the update to the module that the adapter
    does not adapt, so the merged model would no longer compute what the adapter model computes (PEFT
    0.21 merges into the shared tensor). The config then says the weights are no longer tied, so the
    merged model saves both and reloads with the same outputs."""
    if not layers:
        return
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
        text_config = getattr(config, "get_text_config", lambda: config)()
        for cfg in {id(c): c for c in (config, text_config)}.values():
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: inside the block every adapter is off (merged ones are unmerged first and merged
    back after)."""
    merged = {name: list(layer.merged_adapters) for name, layer in lora_layers(model) if layer.merged}
    for _, module in adapter_modules(model):
        if isinstance(module, LoraLayer) and module.merged:
            module.unmerge()
        module.set_disabled(True)
    try:
        yield
    finally:
        for name, module in adapter_modules(model):
            module.set_disabled(False)
            if name in merged:
                module.merge(merged[name])
