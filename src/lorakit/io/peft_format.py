"""PEFT's on-disk adapter format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are the in-memory names under `PeftModel` with the adapter name dropped, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, `...embed_tokens.lora_embedding_A`,
`...lora_magnitude_vector` (DoRA), `base_model.model.lm_head.weight` (modules_to_save) and
`...c_attn.base_layer.bias` (bias="all" / "lora_only"); `lorakit.io.peft_keys` spells them.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError, AdapterShapeError
from lorakit.inject import ALL_LINEAR, adapter_modules, base_modules, lora_layers
from lorakit.io.atomic import atomic_file
from lorakit.io.peft_keys import BASE_LAYER, PREFIX, names_lora_tensor, parse_key
from lorakit.layers import LoraLayer, ModulesToSaveWrapper

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
# Module names whose targeting makes PEFT save the base embedding weights
# (peft.utils.other.EMBEDDING_LAYER_NAMES).
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def bias_tensors(model: nn.Module, config: LoraConfig, adapter_name: str) -> dict[str, Tensor]:
    """Base-model biases trained along with the adapter (bias="all" or "lora_only")."""
    if config.bias == "none":
        return {}
    if config.bias == "lora_only":
        return {
            f"{name}.{BASE_LAYER}.bias": layer.base_layer.bias for name, layer in lora_layers(model)
            if adapter_name in layer.r and getattr(layer.base_layer, "bias", None) is not None
        }
    # Every bias but the adapters' own parameters (lora_bias) and the modules_to_save wrappers' tensors.
    modules = list(adapter_modules(model))
    own = {id(p) for _, m in modules for n in m.adapter_names() for p in m.adapter_parameters(n)}
    skip = tuple(f"{name}." for name, module in modules if isinstance(module, ModulesToSaveWrapper))
    return {
        name: param for name, param in model.named_parameters()
        if name.endswith("bias") and id(param) not in own and not name.startswith(skip)
    }


def _embedding_named_in_targets(model: nn.Module, config: LoraConfig) -> bool:
    """PEFT's test for save_embedding_layers="auto": target_modules names a module called `embed_tokens` or
    `lm_head` (a list entry, or a regex matching such a module). Other embedding names (GPT-2's `wte`) do
    not count, so for them PEFT saves no base weights and neither do we: the key sets stay equal."""
    targets = config.target_modules
    if isinstance(targets, str):
        if targets == ALL_LINEAR:
            return False
        return any(re.fullmatch(targets, name) for name, _ in base_modules(model)
                   if name.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES)
    return any(t in EMBEDDING_LAYER_NAMES for t in targets or [])


def _vocab_resized(model: nn.Module, config: LoraConfig) -> bool:
    """True when the base model named in the config is a local directory whose config.json has another
    vocab_size than `model` (the vocabulary was resized for training). Hub ids are not looked up."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    base = config.base_model_name_or_path
    file = Path(base) / "config.json" if base else None
    if not vocab or file is None or not file.is_file():
        return False
    try:
        saved = json.loads(file.read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return False
    return saved is not None and saved != vocab


def embedding_tensors(model: nn.Module, config: LoraConfig,
                      save_embedding_layers: bool | str) -> dict[str, Tensor]:
    """The base embedding weights PEFT saves with an adapter, keyed relative to `model`.

    "auto" saves them when target_modules names `embed_tokens`/`lm_head` (then only the base weights of the
    input/output embeddings that carry LoRA) or when the vocabulary was resized (then the whole input and
    output embeddings); True saves the whole input and output embeddings; False nothing.
    """
    named = _embedding_named_in_targets(model, config)
    if save_embedding_layers == "auto":
        resized = not named and _vocab_resized(model, config)
        # PEFT's warnings, word for word: scripts and tests written for PEFT look for them.
        if named:
            warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in "
                          "`target_modules`.", UserWarning, stacklevel=2)
        elif resized:
            warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized "
                          "during finetuning.", UserWarning, stacklevel=2)
        save_embedding_layers = named or resized
    if not save_embedding_layers or not hasattr(model, "get_input_embeddings"):
        return {}
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    tensors: dict[str, Tensor] = {}
    for name, module in base_modules(model):
        if not name or isinstance(module, ModulesToSaveWrapper) or all(module is not x for x in layers):
            continue
        if isinstance(module, LoraLayer):
            tensors.update({f"{name}.{BASE_LAYER}.{k}": v for k, v in module.base_layer.named_parameters()})
        elif not named:
            tensors.update({f"{name}.{k}": v for k, v in module.named_parameters()})
    return tensors


def adapter_tensors(
    model: nn.Module, config: LoraConfig, adapter_name: str, save_embedding_layers: bool | str = "auto"
) -> dict[str, Tensor]:
    """Every tensor that belongs to adapter `adapter_name`, keyed by its PEFT on-disk name.

    `model` is the transformers model with adapters injected. With `save_embedding_layers` the base
    embedding weights are included too, by PEFT's rules (see `embedding_tensors`), so that an adapter
    trained with a targeted or resized embedding carries it.
    """
    tensors: dict[str, Tensor] = {}
    for name, module in adapter_modules(model):
        if adapter_name not in module.adapter_names():
            continue
        for key, tensor in module.adapter_state(adapter_name).items():
            tensors[f"{name}.{key}"] = tensor
    tensors.update(bias_tensors(model, config, adapter_name))
    tensors.update(embedding_tensors(model, config, save_embedding_layers))
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
            raise AdapterFileError(f"{legacy}: refused: not a plain tensor file ({type(err).__name__}); "
                                   "lorakit never runs pickled code") from None
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
    optional = optional_keys(model, config, expected)
    model_name = type(model).__name__
    for key, value in saved.items():
        if key not in expected:
            module = key.removeprefix(PREFIX).rsplit(".", 2)[0]
            raise AdapterFileError(
                f"{source}: tensor {key} has no place in this {model_name} (no adapted module {module!r}); "
                "is the adapter for another model architecture?"
            )
        target = expected[key]
        if target.dtype.is_floating_point and not value.dtype.is_floating_point:
            raise AdapterFileError(f"{source}: {key}: saved dtype {value.dtype} is not a floating-point type")
        if value.dtype.is_floating_point and not torch.isfinite(value).all():
            raise AdapterFileError(f"{source}: {key}: holds NaN or infinite values; the adapter is broken")
        if tuple(value.shape) != tuple(target.shape):
            raise AdapterShapeError(
                f"{source}: {key}: saved shape {tuple(value.shape)} does not fit the model's "
                f"{tuple(target.shape)}; is the adapter for another base model?"
            )
    missing = sorted(k for k in expected if k not in saved and k not in optional)
    if missing:
        raise AdapterFileError(f"{source}: missing {len(missing)} tensor(s), e.g. {missing[0]}; the file "
                               "does not match its config")
    with torch.no_grad():
        for key, value in saved.items():
            expected[key].copy_(value)


def optional_keys(model: nn.Module, config: LoraConfig, expected: dict[str, Tensor]) -> set[str]:
    """The expected keys a saved adapter may lack: base tensors (embeddings, base_layer weights and biases),
    which PEFT saves only in some cases, and with bias="all" every bias that is not a LoRA tensor."""
    embeddings = {PREFIX + k for k in embedding_tensors(model, config, True)}
    return {
        key for key in expected
        if key in embeddings or parse_key(key).role == "base"
        or (config.bias == "all" and key.endswith("bias") and not names_lora_tensor(key))
    }


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
