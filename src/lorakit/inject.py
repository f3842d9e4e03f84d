"""Which modules an adapter targets, and swapping them for LoRA layers in place.

The model stays the same transformers object: only the targeted submodules are replaced by a LoRA layer
that holds the original module as `base_layer` (and `unload` puts the original back).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.init import init_embedding, init_zeros, initialiser, moves_base_weight
from lorakit.io.peft_keys import in_modules_to_save
from lorakit.layers import (
    CONV_TYPES,
    AdapterModule,
    AdapterSpec,
    LoraConv,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    ModulesToSaveWrapper,
    is_adapter_module,
    is_conv1d,
)
from lorakit.quant import weights as quant

# PEFT's defaults when target_modules is None: attention query and value projections.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
         "gemma3_text", "opt", "phi", "smollm3", "olmo", "olmo2", "granite", "starcoder2", "stablelm",
         "cohere", "deepseek_v2", "exaone", "internlm2", "mllama"],
        ["q_proj", "v_proj"],
    ),
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "phi3": ["qkv_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}

ALL_LINEAR = "all-linear"
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (quantized subclasses included), transformers' Conv1D, or a LoRA layer around either."""
    return isinstance(module, (nn.Linear, LoraLinear)) or is_conv1d(module)


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() without the internals of adapter layers (their base_layer, lora_A, copies...)."""
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        yield name, module
        if is_adapter_module(module):
            continue
        children = [(f"{name}.{n}" if name else n, m) for n, m in module.named_children()]
        stack.extend(reversed(children))


def _name_matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    if not layers_pattern:
        match = _LAYER_INDEX.match(name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name))), None)
    return int(match.group(1)) if match else None


def resolve_target_modules(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """config.target_modules with None and "all-linear" expanded to concrete module names."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(f"target_modules: no default for model type {model_type!r}; "
                             "pass target_modules explicitly")
        return DEFAULT_TARGET_MODULES[model_type]
    if targets == ALL_LINEAR:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = {name.rsplit(".", 1)[-1] for name, module in base_modules(model)
                 if is_linear_like(module) and module is not head and name}
        head_names = {name.rsplit(".", 1)[-1] for name, module in base_modules(model)
                      if module is head and name}
        return sorted(names - head_names)
    return targets


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules `config` adapts, after exclusions and layer selection.

    Raises ValueError for a target entry that matches no module, naming it and some available names.
    """
    targets = resolve_target_modules(model, config)
    saved = config.modules_to_save or []
    layers = config.layers_to_transform
    layers = [layers] if isinstance(layers, int) else layers
    found, seen_entries, excluded = [], set(), 0
    for name, module in base_modules(model):
        if not name:
            continue
        if isinstance(targets, str):
            if re.fullmatch(targets, name) is None:
                continue
            seen_entries.add(targets)
        else:
            hits = [t for t in targets if name == t or name.endswith(f".{t}")]
            if not hits:
                continue
            seen_entries.update(hits)
            # A full module name is taken whatever its layer.
            if not (layers is None or name in targets or _layer_index(name, config.layers_pattern) in layers):
                continue
        # Exclusions come after the match, so an entry whose modules are all excluded (e.g. "all-linear"
        # minus exclude_modules) still counts as matched.
        if in_modules_to_save(name, saved):
            continue
        if config.exclude_modules and _name_matches(name, config.exclude_modules):
            excluded += 1
            continue
        if isinstance(module, ModulesToSaveWrapper):
            continue
        found.append(name)
    entries = [targets] if isinstance(targets, str) else targets
    missing = [t for t in entries if t not in seen_entries]
    if missing:
        linear = {n.rsplit(".", 1)[-1] for n, m in base_modules(model) if n and is_linear_like(m)}
        sample = sorted(linear)[:12]
        raise ValueError(
            f"target_modules: {', '.join(map(repr, missing))} matched no module of {type(model).__name__}; "
            f"linear modules available include: {', '.join(sample)}"
        )
    if not found:
        raise ValueError(
            f"target_modules: every module matching {config.target_modules!r} is excluded (by "
            "exclude_modules, layers_to_transform or modules_to_save); nothing is left to adapt"
        )
    if config.exclude_modules and not excluded:
        warnings.warn(f"You have passed exclude_modules={config.exclude_modules} but no modules were "
                      "excluded. Please check that exclude_modules was set correctly.", UserWarning,
                      stacklevel=2)
    return found


def adapter_spec(config: LoraConfig, name: str, base: nn.Module,
                 autocast_adapter_dtype: bool = True) -> AdapterSpec:
    """Resolve rank, alpha, scaling and dtype of one adapter on one module."""
    r, alpha = config.rank_for(name), config.alpha_for(name)
    weight = getattr(base, "weight", None)
    dtype = torch.float32
    if not autocast_adapter_dtype and quant.is_quantized(base):
        # The stored dtype of a bitsandbytes weight is its codes' (int8, uint8 or a packing float):
        # the base's own float dtype is the one a 4-bit layer computes in (8-bit layers name none).
        dtype = quant.compute_dtype(base) or torch.float32
    elif not autocast_adapter_dtype and weight is not None and weight.dtype.is_floating_point:
        dtype = weight.dtype
    return AdapterSpec(
        r=r, alpha=alpha, scaling=config.scaling(r, alpha), dropout=config.lora_dropout,
        init=config.init_lora_weights, use_dora=config.use_dora, lora_bias=config.lora_bias, dtype=dtype,
    )


def _wrap(module: nn.Module, name: str, config: LoraConfig) -> LoraLayer:
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module, name)
    if is_conv1d(module):
        if not config.fan_in_fan_out:
            # One message for all such layers (the text carries no module name, so Python shows it once).
            warnings.warn("Conv1D layers store weights as (in, out); using fan_in_fan_out=True for them",
                          stacklevel=4)
        return LoraLinear(module, name, fan_in_fan_out=True)
    if isinstance(module, nn.Linear):
        if config.fan_in_fan_out:
            warnings.warn("nn.Linear layers store weights as (out, in); using fan_in_fan_out=False for them",
                          stacklevel=4)
        return LoraLinear(module, name, fan_in_fan_out=False)
    if isinstance(module, CONV_TYPES):
        return LoraConv(module, name)
    raise ValueError(
        f"{name}: cannot adapt a {type(module).__name__}; LoRA supports nn.Linear, Conv1D, nn.Embedding and "
        "nn.Conv1d/2d/3d (target its linear submodules instead)"
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def new_adapter_config(model: nn.Module, adapter_name: str, config: LoraConfig,
                       existing: Mapping[str, LoraConfig]) -> LoraConfig:
    """The config to keep for a new adapter `adapter_name` next to the `existing` ones, or ValueError why it
    cannot be added. It is a copy (the caller's config is never changed) in which None and "all-linear"
    targets become the concrete module names, as PEFT records them, so that the saved config means the same
    to every loader (including on a model that already carries LoRA layers)."""
    if adapter_name in existing:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
    if config.bias != "none":
        others = [n for n, c in existing.items() if c.bias != "none"]
        if others:
            # The base biases are shared: two adapters training (and saving) them would overwrite each
            # other.
            raise ValueError(f"adapter {adapter_name!r}: bias={config.bias!r}, but adapter {others[0]!r} "
                             "already trains the base biases; only one adapter may use bias other than "
                             "'none' (as in PEFT)")
    if config.target_modules is None or config.target_modules == ALL_LINEAR:
        return dataclasses.replace(config, target_modules=list(resolve_target_modules(model, config)))
    return dataclasses.replace(config)


def inject_adapter(
    model: nn.Module, config: LoraConfig, adapter_name: str, *, autocast_adapter_dtype: bool = True,
    low_cpu_mem_usage: bool = False,
) -> list[str]:
    """Add adapter `adapter_name` to every module `config` targets; returns the adapted module names.

    With `low_cpu_mem_usage` (PEFT's name for an adapter about to receive saved weights) the factors start
    at zero, skipping the random init, unless the init moves the base weight (OLoRA, PiSSA), whose residual
    must be recomputed from the base.
    """
    targets = find_targets(model, config)
    method = config.init_lora_weights
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLayer):
            module = _wrap(module, name, config)
            _set_submodule(model, name, module)
        spec = adapter_spec(config, name, module.base_layer, autocast_adapter_dtype)
        if low_cpu_mem_usage and not moves_base_weight(method):
            init = init_zeros
        elif isinstance(module, LoraEmbedding) and method is not False:
            init = init_embedding
        else:
            init = initialiser(method)
        module.add_adapter(adapter_name, spec, init)
    for name in config.modules_to_save or []:
        _add_modules_to_save(model, name, adapter_name)
    return targets


def _add_modules_to_save(model: nn.Module, target: str, adapter_name: str) -> None:
    matched = False
    for name, module in list(base_modules(model)):
        if name and (name == target or name.endswith(f".{target}")):
            matched = True
            if not isinstance(module, ModulesToSaveWrapper):
                if is_adapter_module(module):
                    raise ValueError(f"modules_to_save: {name} already carries LoRA adapters")
                module = ModulesToSaveWrapper(module, name)
                _set_submodule(model, name, module)
            module.add_adapter(adapter_name)
    if not matched:
        raise ValueError(f"modules_to_save: {target!r} matched no module of {type(model).__name__}")


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """(name, module) of every adapter-carrying module in the model."""
    for name, module in base_modules(model):
        if is_adapter_module(module):
            yield name, module


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """(name, layer) of every LoRA layer in the model (adapter modules other than modules_to_save)."""
    return [(name, module) for name, module in adapter_modules(model) if isinstance(module, LoraLayer)]


def remove_adapter(model: nn.Module, adapter_name: str, unwrap_empty: bool) -> None:
    """Delete adapter `adapter_name` from every module; with `unwrap_empty` (rolling back a failed add),
    modules left with no adapter at all go back to being their original module."""
    for _, module in list(adapter_modules(model)):
        module.delete_adapter(adapter_name)
    if unwrap_empty:
        for name, module in list(adapter_modules(model)):
            if not module.adapter_names():
                original = module.base_layer if isinstance(module, LoraLayer) else module.original_module
                _set_submodule(model, name, original)


def remove_adapter_modules(model: nn.Module, keep_saved_copy: bool) -> None:
    """Put original modules back: LoRA layers become their base layer; a modules_to_save wrapper
    becomes its active copy (`keep_saved_copy`, even inside `disable_adapter`) or the original module."""
    for name, module in list(adapter_modules(model)):
        if isinstance(module, LoraLayer):
            replacement = module.base_layer
        else:
            module.set_disabled(False)
            replacement = module.current_module() if keep_saved_copy else module.original_module
        _set_submodule(model, name, replacement)
