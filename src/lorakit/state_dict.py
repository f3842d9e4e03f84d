"""PEFT's low-level functions: an adapter's tensors as a state dict, loading one, and injecting adapters into
a plain model without a `PeftModel` wrapper.

Keys are PEFT's on-disk names (`lorakit.io.peft_keys`): the in-memory name with the adapter name dropped,
e.g. `base_model.model.lin0.lora_A.weight` for a `PeftModel`. For a model injected with
`inject_adapter_in_model` the keys are relative to that model (`lin0.lora_A.weight`), as in PEFT.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.config import LoraConfig
from lorakit.inject import adapter_modules
from lorakit.io import peft_format
from lorakit.io.peft_keys import PREFIX
from lorakit.io.pretrained import LoadResult
from lorakit.layers import LoraLayer
from lorakit.lora_model import LoraModel


def _unwrap(model: nn.Module) -> tuple[nn.Module, dict[str, LoraConfig], str]:
    """(adapted transformers model, configs by adapter name, key prefix) for a PeftModel, a LoraModel or a
    model given adapters by `inject_adapter_in_model`."""
    base = getattr(model, "base_model", None)
    if isinstance(base, LoraModel):
        return base.model, base.peft_config, PREFIX
    if isinstance(model, LoraModel):
        return model.model, model.peft_config, ""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise ValueError(
            f"{type(model).__name__} carries no LoRA adapters (no peft_config); use "
            "get_peft_model or inject_adapter_in_model first"
        )
    return model, configs, ""


def _tensors(model: nn.Module, adapter_name: str, save_embedding_layers: bool | str) -> dict[str, Tensor]:
    inner, configs, prefix = _unwrap(model)
    if adapter_name not in configs:
        raise ValueError(f"Adapter {adapter_name} not found in {sorted(configs)}")
    tensors = peft_format.adapter_tensors(inner, configs[adapter_name], adapter_name, save_embedding_layers)
    return {prefix + key.removeprefix(PREFIX): value for key, value in tensors.items()}


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, Tensor]:
    """The tensors of adapter `adapter_name` under PEFT's saved names (what `save_pretrained` writes).

    state_dict: the model's full state dict (in-memory names) to take the values from instead of the live
    parameters, e.g. one gathered from FSDP shards. unwrap_compiled: accepted for PEFT's signature (a
    compiled model's `_orig_mod` is used either way).
    """
    model = getattr(model, "_orig_mod", model)
    tensors = _tensors(model, adapter_name, save_embedding_layers)
    if state_dict is None:
        return {key: value.detach() for key, value in tensors.items()}
    names = {id(param): name for name, param in model.state_dict(keep_vars=True).items()}
    return {
        key: state_dict[names[id(value)]] if names.get(id(value)) in state_dict else value.detach()
        for key, value in tensors.items()
    }


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Copy PEFT-named tensors (`get_peft_model_state_dict`'s keys) into adapter `adapter_name`.

    Returns the load result: `missing_keys` (in-memory names of the adapter's tensors the dict lacks) and
    `unexpected_keys` (keys that name no tensor of the adapter). A tensor whose shape does not fit raises
    RuntimeError naming both shapes, or with `ignore_mismatched_sizes` is skipped and reported missing.
    low_cpu_mem_usage: accepted for PEFT's signature; parameters on the meta device (from
    `inject_adapter_in_model(..., low_cpu_mem_usage=True)`) are replaced by the given tensors in any case.
    """
    model = getattr(model, "_orig_mod", model)
    inner, configs, _ = _unwrap(model)
    expected = _tensors(model, adapter_name, save_embedding_layers=True)
    optional = {
        key.removeprefix(PREFIX)
        for key in peft_format.optional_keys(
            inner,
            configs[adapter_name],
            peft_format.adapter_tensors(inner, configs[adapter_name], adapter_name, True),
        )
    }
    own = model.state_dict(keep_vars=True)
    names = {id(param): name for name, param in own.items()}
    missing = [
        names.get(id(t), k)
        for k, t in expected.items()
        if k not in peft_model_state_dict and k.removeprefix(PREFIX) not in optional
    ]
    # A key that is no tensor of this adapter but names a base tensor as it is (e.g. a bias trained with
    # bias="all" while this config says "none") is loaded into it, as PEFT does.
    unexpected = [key for key in peft_model_state_dict if key not in expected and key not in own]
    for key, value in peft_model_state_dict.items():
        target = expected.get(key, own.get(key))
        if target is None:
            continue
        if tuple(value.shape) != tuple(target.shape):
            if not ignore_mismatched_sizes:
                raise RuntimeError(
                    f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                    f"the shape in the current model is {tuple(target.shape)}"
                )
            missing.append(names.get(id(target), key))
            continue
        if target.device.type == "meta":
            # Injected with low_cpu_mem_usage: the value becomes the parameter (on the value's device).
            owner, _, attr = names.get(id(target), key).rpartition(".")
            parameter = nn.Parameter(value.to(dtype=target.dtype), requires_grad=target.requires_grad)
            model.get_submodule(owner)._parameters[attr] = parameter
            continue
        target.data.copy_(value.to(device=target.device, dtype=target.dtype))
    return LoadResult(missing, unexpected)


def _to_meta(model: nn.Module, adapter_name: str) -> None:
    """Replace adapter `adapter_name`'s parameters by empty ones on the meta device (PEFT's
    low_cpu_mem_usage for injection: no memory until `set_peft_model_state_dict` gives them values)."""
    for _, module in adapter_modules(model):
        ids = {id(p) for p in module.adapter_parameters(adapter_name)}
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and id(param) in ids:
                    sub._parameters[name] = nn.Parameter(
                        torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                    )


def inject_adapter_in_model(
    peft_config: LoraConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, Tensor] | None = None,
) -> nn.Module:
    """Add LoRA adapter `adapter_name` to `model` in place, with no `PeftModel` around it; returns `model`.

    The configs are kept as `model.peft_config` (by adapter name), as PEFT does, so that
    `get_peft_model_state_dict(model)` finds them. state_dict: PEFT uses its keys to choose the targets;
    lorakit takes them from the config and refuses a state_dict that names other modules.
    """
    lora = LoraModel(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    if state_dict is not None:
        saved = {key.removeprefix(PREFIX) for key in _tensors(lora, adapter_name, True)}
        unknown = sorted(k for k in state_dict if k.removeprefix(PREFIX) not in saved and "lora_" in k)
        if unknown:
            raise ValueError(
                f"inject_adapter_in_model: state_dict key {unknown[0]!r} names a LoRA tensor the "
                f"config does not create (target_modules={peft_config.target_modules!r})"
            )
    if low_cpu_mem_usage:
        _to_meta(model, adapter_name)
    model.peft_config = lora.peft_config
    return model


def _original_keys(inner: nn.Module) -> dict[str, str]:
    """For every base tensor of the adapted model `inner`: its key before adapters were injected → its key
    now (a LoRA layer's `x.base_layer.w` was `x.w`, a modules_to_save wrapper's `x.original_module.w` was
    `x.w`); adapter tensors are left out."""
    wrapped: dict[str, str] = {}
    for name, module in adapter_modules(inner):
        inside = "base_layer" if isinstance(module, LoraLayer) else "original_module"
        wrapped[f"{name}." if name else ""] = inside
    mapping: dict[str, str] = {}
    for key in inner.state_dict():
        original, rest = "", key
        for prefix in sorted(wrapped, key=len, reverse=True):
            if key.startswith(prefix) and key[len(prefix) :].startswith(wrapped[prefix] + "."):
                original, rest = prefix, key[len(prefix) + len(wrapped[prefix]) + 1 :]
                break
            if key.startswith(prefix) and prefix:
                break  # an adapter tensor of that module (lora_A..., modules_to_save...)
        else:
            mapping[key] = key
            continue
        if original or rest != key:
            mapping[original + rest] = key
    return mapping


def get_base_model_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base model's tensors under the keys they had before adapters were injected (PEFT's
    `get_base_model_state_dict`), e.g. to save or re-shard the base weights of an adapted model."""
    inner, _, _ = _unwrap(getattr(model, "_orig_mod", model))
    state = inner.state_dict()
    return {original: state[current] for original, current in _original_keys(inner).items()}


def set_base_model_state_dict(
    model: nn.Module, state_dict: dict[str, Tensor], strict: bool = True
) -> LoadResult:
    """Load base-model tensors given under their original keys into the adapted model (the inverse of
    `get_base_model_state_dict`). Returns missing and unexpected original keys; `strict` raises RuntimeError
    for either."""
    inner, _, _ = _unwrap(getattr(model, "_orig_mod", model))
    mapping = _original_keys(inner)
    missing = [key for key in mapping if key not in state_dict]
    unexpected = [key for key in state_dict if key not in mapping]
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"Error(s) in loading state_dict: missing keys {missing}, unexpected keys {unexpected}"
        )
    inner.load_state_dict({mapping[k]: v for k, v in state_dict.items() if k in mapping}, strict=False)
    return LoadResult(missing, unexpected)
