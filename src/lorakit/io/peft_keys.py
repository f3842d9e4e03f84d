"""PEFT's names for adapter tensors: the one module that spells them (it imports nothing from lorakit).

A saved key is `PREFIX + <module name> + "." + <name>`, where `<module name>` is the module's name in the
transformers model and `<name>` is one of:

- `lora_A.weight`, `lora_B.weight` (+ `lora_B.bias` with lora_bias): LoRA factors of a Linear / Conv1D;
- `lora_embedding_A`, `lora_embedding_B`: LoRA factors of an embedding (raw parameters, no `.weight`);
- `lora_magnitude_vector` (`lora_magnitude_vector.weight` in older PEFT files): DoRA's magnitude;
- `base_layer.<param>`: a base tensor of an adapted module saved with the adapter (biases, embeddings);
- `<param>`: any other tensor, e.g. the trained copy of a `modules_to_save` module, or a base bias.

In memory the same tensors sit under the adapter's name, e.g. `...q_proj.lora_A.default.weight`; on disk
the adapter name is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "base_model.model."
LINEAR_FACTORS = ("lora_A.weight", "lora_B.weight")
EMBEDDING_FACTORS = ("lora_embedding_A", "lora_embedding_B")
LORA_BIAS = "lora_B.bias"
MAGNITUDE = "lora_magnitude_vector"
BASE_LAYER = "base_layer"

# Name after the module → (role, whether the module is an embedding).
_LORA_NAMES: dict[str, tuple[str, bool]] = {
    LINEAR_FACTORS[0]: ("A", False),
    LINEAR_FACTORS[1]: ("B", False),
    LORA_BIAS: ("bias", False),
    EMBEDDING_FACTORS[0]: ("A", True),
    EMBEDDING_FACTORS[1]: ("B", True),
    MAGNITUDE: ("magnitude", False),
    f"{MAGNITUDE}.weight": ("magnitude", False),
}


@dataclass(frozen=True)
class SavedKey:
    """A saved key taken apart. `role` is "A", "B", "bias" or "magnitude" for a LoRA tensor, "base" for
    `<module>.base_layer.<param>` and "tensor" for any other `<module>.<param>`; `param` is empty for LoRA
    tensors."""

    module: str
    role: str
    param: str = ""
    embedding: bool = False

    @property
    def parameter(self) -> str:
        """For "base" and "tensor" keys: the parameter's name in the model (`base_layer` dropped)."""
        return f"{self.module}.{self.param}" if self.module else self.param


def factor_names(embedding: bool) -> tuple[str, str]:
    """The names of (A, B) after the module name: an embedding's are raw parameters."""
    return EMBEDDING_FACTORS if embedding else LINEAR_FACTORS


def saved_key(module: str, name: str) -> str:
    """The on-disk key of tensor `name` (e.g. "lora_A.weight") of module `module`."""
    return f"{PREFIX}{module}.{name}" if module else f"{PREFIX}{name}"


def names_lora_tensor(key: str) -> bool:
    """Whether a key (saved or in-memory) names a LoRA tensor: one of its parts is a `lora_*` attribute."""
    return any(part.startswith("lora_") for part in key.split("."))


def parse_key(key: str) -> SavedKey:
    """Take a saved key apart; ValueError (naming the key) if it is not under PREFIX or names a LoRA tensor
    of an unknown kind."""
    if not key.startswith(PREFIX):
        raise ValueError(f"tensor {key!r} is not under {PREFIX!r}; not a PEFT LoRA adapter")
    rest = key[len(PREFIX):]
    for name, (role, embedding) in _LORA_NAMES.items():
        if rest.endswith(f".{name}"):
            return SavedKey(rest[: -len(name) - 1], role, embedding=embedding)
    if names_lora_tensor(rest):
        raise ValueError(f"tensor {key!r} is not a LoRA tensor lorakit knows")
    if f".{BASE_LAYER}." in rest:
        module, param = rest.split(f".{BASE_LAYER}.", 1)
        return SavedKey(module, "base", param)
    module, _, param = rest.rpartition(".")
    return SavedKey(module, "tensor", param)


def in_modules_to_save(module: str, modules_to_save: Sequence[str] | None) -> bool:
    """Whether `module` is, or lies inside, a module named by a `modules_to_save` entry (PEFT matches an
    entry against whole dotted parts of the name)."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", module) for m in modules_to_save or [])
