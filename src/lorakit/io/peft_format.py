"""PEFT's on-disk adapter format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are the in-memory names under `PeftModel` with the adapter name dropped, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, `...embed_tokens.lora_embedding_A`,
`...lora_magnitude_vector` (DoRA), `base_model.model.lm_head.weight` (modules_to_save) and
`...c_attn.base_layer.bias` (bias="all" / "lora_only").
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lorakit.config import CONFIG_NAME, LoraConfig
from lorakit.errors import AdapterFileError
from lorakit.inject import adapter_modules
from lorakit.io.atomic import atomic_file
from lorakit.layers import LoraEmbedding, LoraLayer, ModulesToSaveWrapper

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def bias_tensors(model: nn.Module, config: LoraConfig, adapter_name: str) -> dict[str, Tensor]:
    """Base-model biases trained along with the adapter (bias="all" or "lora_only")."""
    if config.bias == "none":
        return {}
    if config.bias == "lora_only":
        return {
            f"{name}.base_layer.bias": module.base_layer.bias
            for name, module in adapter_modules(model)
            if isinstance(module, LoraLayer) and adapter_name in module.r and getattr(module.base_layer, "bias", None) is not None
        }
    skip = tuple(f"{name}." for name, module in adapter_modules(model) if isinstance(module, ModulesToSaveWrapper))
    return {
        name: param for name, param in model.named_parameters()
        if name.endswith("bias") and "lora_" not in name and not name.startswith(skip)
    }


def adapter_tensors(
    model: nn.Module, config: LoraConfig, adapter_name: str, save_embedding_layers: bool | str = "auto"
) -> dict[str, Tensor]:
    """Every tensor that belongs to adapter `adapter_name`, keyed by its PEFT on-disk name.

    `model` is the transformers model with adapters injected. With `save_embedding_layers` ("auto":
    when an embedding is targeted, as PEFT does) the base embedding weights are included too, so an
    adapter trained after resizing the vocabulary carries its embeddings.
    """
    tensors: dict[str, Tensor] = {}
    embeddings = []
    for name, module in adapter_modules(model):
        if adapter_name not in module.adapter_names():
            continue
        for key, tensor in module.adapter_state(adapter_name).items():
            tensors[f"{name}.{key}"] = tensor
        if isinstance(module, LoraEmbedding):
            embeddings.append((name, module))
    tensors.update(bias_tensors(model, config, adapter_name))
    if save_embedding_layers is True or (save_embedding_layers == "auto" and embeddings):
        for name, module in embeddings:
            tensors[f"{name}.base_layer.weight"] = module.base_layer.weight
    return {PREFIX + key: value for key, value in tensors.items()}


def save_adapter_files(directory: Path, config: LoraConfig, tensors: dict[str, Tensor]) -> None:
    """Write config and weights; each file appears atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # safetensors refuses tensors that share storage (tied weights); store independent copies.
    seen: set[int] = set()
    for key, value in contiguous.items():
        if value.data_ptr() in seen:
            contiguous[key] = value.clone()
        seen.add(contiguous[key].data_ptr())
    with atomic_file(directory / WEIGHTS_NAME) as tmp:
        save_file(contiguous, str(tmp), metadata={"format": "pt"})
    config.save_pretrained(directory)


def read_adapter_weights(directory: Path) -> dict[str, Tensor]:
    """Load the adapter's tensors on the CPU. Pickled `.bin` files are read with weights_only=True, so
    they can hold tensors but never run code."""
    file = directory / WEIGHTS_NAME
    if file.is_file():
        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterFileError(f"{file}: cannot read safetensors file ({err})") from None
    legacy = directory / PICKLE_WEIGHTS_NAME
    if legacy.is_file():
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is refused
            raise AdapterFileError(f"{legacy}: refused: not a plain tensor file ({type(err).__name__}); lorakit never runs pickled code") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise AdapterFileError(f"{legacy}: expected a mapping of names to tensors")
        return state
    raise AdapterFileError(f"{directory}: no {WEIGHTS_NAME} found")


def load_adapter_tensors(
    model: nn.Module, config: LoraConfig, adapter_name: str, saved: dict[str, Tensor], source: str
) -> None:
    """Copy saved tensors into adapter `adapter_name` of `model` (already injected), checking every key
    and shape; errors name the file, the module and both shapes."""
    expected = adapter_tensors(model, config, adapter_name, save_embedding_layers=True)
    optional = {k for k in expected if k.endswith(".base_layer.weight") or k.endswith(".base_layer.bias") or (config.bias == "all" and k.endswith("bias") and "lora_" not in k)}
    model_name = type(model).__name__
    for key, value in saved.items():
        if key not in expected:
            module = key.removeprefix(PREFIX).rsplit(".", 2)[0]
            raise AdapterFileError(
                f"{source}: tensor {key} has no place in this {model_name} (no adapted module {module!r}); "
                "is the adapter for another model architecture?"
            )
        target = expected[key]
        if tuple(value.shape) != tuple(target.shape):
            raise AdapterFileError(
                f"{source}: {key}: saved shape {tuple(value.shape)} does not fit the model's {tuple(target.shape)}; "
                "is the adapter for another base model?"
            )
    missing = sorted(k for k in expected if k not in saved and k not in optional)
    if missing:
        raise AdapterFileError(f"{source}: missing {len(missing)} tensor(s), e.g. {missing[0]}; the file does not match its config")
    with torch.no_grad():
        for key, value in saved.items():
            expected[key].copy_(value)


def adapter_directory(path: str | Path, subfolder: str | None = None) -> Path:
    """The local directory of an adapter; a hub id is downloaded where a hub is reachable."""
    local = Path(path) / subfolder if subfolder else Path(path)
    if local.is_dir():
        return local
    if Path(path).exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise AdapterFileError(f"{local}: adapter directory not found")
    from lorakit.models.sources import download_snapshot

    root = download_snapshot(str(path), allow_patterns=[f"{subfolder + '/' if subfolder else ''}*"])
    return root / subfolder if subfolder else root


__all__ = [
    "CONFIG_NAME", "PREFIX", "WEIGHTS_NAME", "adapter_directory", "adapter_tensors", "bias_tensors", "load_adapter_tensors",
    "read_adapter_weights", "save_adapter_files",
]
