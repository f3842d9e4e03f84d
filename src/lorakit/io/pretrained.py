"""The file side of `PeftModel.from_pretrained`, `load_adapter` and `save_pretrained`: one adapter
directory read into memory, its weights copied into a live model, a live adapter written out.

`model` is always the adapted transformers model (`PeftModel.get_base_model()`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError
from lorakit.inject import adapter_modules
from lorakit.io import peft_format
from lorakit.io.portable import portable_adapter

_ADAPTER_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def check_adapter_name(name: str) -> str:
    """Adapter names become sub-folder names on save and keys of the layers' `nn.ModuleDict`s: refuse
    separators, '..', odd characters and the names of module methods ('train', 'eval', 'to', ...), which a
    ModuleDict cannot hold."""
    if not isinstance(name, str) or not name or name in (".", "..") or not set(name) <= _ADAPTER_NAME_CHARS:
        raise ValueError(f"adapter name {name!r}: use letters, digits, '_', '-' or '.' "
                         "(it becomes a folder name)")
    if hasattr(nn.ModuleDict, name):
        raise ValueError(f"adapter name {name!r}: the name of a torch module attribute; choose another name")
    return name


class LoadResult(NamedTuple):
    """What loading adapter weights reports, as PEFT's (and torch's `load_state_dict`) result: in-memory
    names of the adapter's tensors the source lacked, and source keys that have no place in the model."""

    missing_keys: list[str]
    unexpected_keys: list[str]


@dataclass(frozen=True)
class SavedAdapter:
    """A saved adapter read into memory: its directory, its config and its tensors (on the CPU)."""

    directory: Path
    config: LoraConfig
    tensors: dict[str, Tensor]

    @property
    def source(self) -> str:
        """The weights file, for error messages."""
        return str(self.directory / peft_format.WEIGHTS_NAME)

    def misfit(self, model: nn.Module, err: ValueError) -> AdapterFileError:
        """The error for an adapter whose config cannot be added to `model` (`err` says why)."""
        return AdapterFileError(f"{self.directory}: adapter does not fit this {type(model).__name__}: {err}")


def read_saved_adapter(model_id: str | os.PathLike, subfolder: str | None = None,
                       config: LoraConfig | None = None, is_trainable: bool = False) -> SavedAdapter:
    """Read an adapter directory (lorakit's or PEFT's). `config` replaces the saved config; as in PEFT, the
    config kept is that object itself, its inference_mode set to `not is_trainable`."""
    directory = peft_format.adapter_directory(model_id, subfolder)
    config = config or LoraConfig.from_pretrained(directory)
    config.inference_mode = not is_trainable
    return SavedAdapter(directory, config, peft_format.read_adapter_weights(directory))


def load_saved_weights(model: nn.Module, adapter_name: str, config: LoraConfig, saved: SavedAdapter,
                       torch_dtype: torch.dtype | None = None) -> None:
    """Copy `saved`'s tensors into adapter `adapter_name` of `model`, added from `saved.config` (with
    `low_cpu_mem_usage=True`: its factors are about to be overwritten) and recorded as `config`;
    `torch_dtype` casts the adapter's parameters first. AdapterFileError (naming the file) for a tensor
    that does not fit."""
    if torch_dtype is not None:
        for _, module in adapter_modules(model):
            for param in module.adapter_parameters(adapter_name):
                param.data = param.data.to(torch_dtype)
    peft_format.load_adapter_tensors(model, config, adapter_name, saved.tensors, saved.source)


def save_adapters(model: nn.Module, configs: Mapping[str, LoraConfig], root: Path,
                  save_embedding_layers: bool | str = "auto", portable: bool = True,
                  tensors: Mapping[str, dict[str, Tensor]] | None = None) -> None:
    """Write each adapter of `configs` in PEFT's format (config saved with inference_mode): "default" into
    `root`, others into sub-folders named after them.

    portable: an adapter whose init moved the base weight (OLoRA, PiSSA) is saved so that it applies to the
    untouched base (see `lorakit.io.portable`). tensors: per adapter, its tensors under their PEFT names to
    write instead of the model's own (`adapter_tensors`), e.g. gathered whole from FSDP shards.
    """
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root}: exists and is not a directory")
    for name, config in configs.items():
        if tensors is not None:
            written = tensors[name]
        else:
            written = peft_format.adapter_tensors(model, config, name, save_embedding_layers)
        if portable:
            config, written = portable_adapter(model, name, config, written)
        directory = root if name == "default" else root / check_adapter_name(name)
        peft_format.save_adapter_files(directory, dataclasses.replace(config, inference_mode=True), written)
