"""A saved adapter read lazily: its config, its tensors by name (shape known before reading), and the
tensors grouped into what they mean for the base model.

PEFT's on-disk names (`lorakit.io.peft_keys`) say it all: LoRA factors, lora_bias and DoRA magnitudes
of a module; `<module>.base_layer.<param>`, a base tensor saved with the adapter (biases, resized
embeddings), loaded into the base parameter in place; `<module>.<param>` of a `modules_to_save` module,
the trained copy that replaces the whole module; other `<module>.<param>` tensors (bias="all"), base
biases loaded in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError
from lorakit.io.checkpoint import TensorReader, file_tensors
from lorakit.io.peft_format import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, adapter_directory, read_adapter_weights
from lorakit.io.peft_keys import in_modules_to_save, parse_key


@dataclass(frozen=True)
class LoraModule:
    """The LoRA tensors of one adapted module (keys into the adapter file)."""

    name: str
    embedding: bool
    lora_A: str
    lora_B: str
    magnitude: str | None
    lora_bias: str | None
    rank: int


@dataclass(frozen=True)
class SavedTensor:
    """A whole base tensor carried by the adapter: `param` is its name in the model (base_layer dropped);
    `whole_module` marks a modules_to_save copy (replaces the module) rather than an in-place load."""

    param: str
    key: str
    whole_module: bool


class AdapterFile:
    """One adapter directory: config + weights, read tensor by tensor. Use as a context manager."""

    def __init__(self, directory: Path, config: LoraConfig) -> None:
        self.directory = directory
        self.config = config
        self.file = directory / WEIGHTS_NAME
        self._loaded: dict[str, Tensor] | None = None
        self._reader: TensorReader | None = None
        if self.file.is_file():
            infos = file_tensors(self.file)
            self.shapes = {info.name: info.shape for info in infos}
            self.dtypes = {info.name: info.dtype for info in infos}
            self._reader = TensorReader(directory)
        else:
            # Legacy pickled weights (read with weights_only=True); small enough to hold.
            self._loaded = read_adapter_weights(directory)
            self.file = directory / PICKLE_WEIGHTS_NAME
            self.shapes = {key: tuple(value.shape) for key, value in self._loaded.items()}
            self.dtypes = {key: value.dtype for key, value in self._loaded.items()}

    def get(self, key: str) -> Tensor:
        if self._loaded is not None:
            return self._loaded[key]
        assert self._reader is not None
        return self._reader.get(self.file.name, key)

    @property
    def size_bytes(self) -> int:
        return self.file.stat().st_size

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def __enter__(self) -> AdapterFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def layout(self) -> tuple[list[LoraModule], list[SavedTensor]]:
        """The adapted modules and the whole tensors, validated against the config."""
        roles: dict[str, dict[str, str]] = {}
        embedding: set[str] = set()
        saved: list[SavedTensor] = []
        for key in self.shapes:
            try:
                parsed = parse_key(key)
            except ValueError as err:
                raise AdapterFileError(f"{self.file}: {err}") from None
            if parsed.role in ("base", "tensor"):
                # A tensor of a modules_to_save module is its trained copy; any other is loaded in place.
                whole = parsed.role == "tensor" and in_modules_to_save(parsed.module,
                                                                       self.config.modules_to_save)
                saved.append(SavedTensor(parsed.parameter, key, whole_module=whole))
            else:
                roles.setdefault(parsed.module, {})[parsed.role] = key
                if parsed.embedding:
                    embedding.add(parsed.module)
        return [self._module(name, parts, name in embedding) for name, parts in roles.items()], saved

    def _module(self, name: str, parts: dict[str, str], embedding: bool) -> LoraModule:
        missing = [role for role in ("A", "B") if role not in parts]
        if missing:
            raise AdapterFileError(f"{self.file}: module {name!r} lacks its lora_{missing[0]} tensor")
        if self.config.use_dora != ("magnitude" in parts):
            state = "lacks" if self.config.use_dora else "has"
            raise AdapterFileError(f"{self.file}: module {name!r} {state} a DoRA magnitude vector but the "
                                   f"config says use_dora={self.config.use_dora}")
        a, b = self.shapes[parts["A"]], self.shapes[parts["B"]]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise AdapterFileError(f"{self.file}: module {name!r}: lora_A {a} and lora_B {b} are not (r, in) "
                                   "and (out, r)")
        expected = self.config.rank_for(name)
        if a[0] != expected:
            raise AdapterFileError(f"{self.file}: module {name!r} has rank {a[0]} but its config gives "
                                   f"r={expected}")
        return LoraModule(name, embedding, parts["A"], parts["B"], parts.get("magnitude"), parts.get("bias"),
                          a[0])

    def scaling(self, module: str) -> float:
        """s for one module, from the config's r/alpha (patterns applied) and rsLoRA."""
        return self.config.scaling(self.config.rank_for(module), self.config.alpha_for(module))

    def delta_norm(self, module: LoraModule) -> float:
        """‖s · B A‖_F without forming B A: ‖BA‖_F² = tr((BᵀB)(AAᵀ)), two r × r matrices (float64)."""
        a = self.get(module.lora_A).to(torch.float64)
        b = self.get(module.lora_B).to(torch.float64)
        squared = float(((b.T @ b) * (a @ a.T)).sum())
        return abs(self.scaling(module.name)) * max(squared, 0.0) ** 0.5


def open_adapter(path: str | Path) -> AdapterFile:
    """Open a saved adapter directory (lorakit's or PEFT's); errors name the file at fault."""
    directory = adapter_directory(path)
    return AdapterFile(directory, LoraConfig.from_pretrained(directory))
