"""What a GGUF file says about the model: llama.cpp's architecture name, hyperparameter keys and tensor names.

lorakit exports the Llama family that both llama.cpp and transformers' GGUF loader cover:

    transformers model_type   GGUF general.architecture   q/k rows
    llama (SmolLM2 too)       llama                       permuted (see below)
    mistral                   llama (as llama.cpp's converter writes it)
    qwen2                     qwen2                       as stored

Tensor names come from the `gguf` package's own map (`model.layers.3.self_attn.q_proj.weight` →
`blk.3.attn_q.weight`). Everything else is refused with one line naming the architecture.

Rotary layout: transformers' Llama rotates the two halves of each head (rotate_half), llama.cpp's `llama`
architecture rotates adjacent pairs. llama.cpp's converter therefore reorders the rows of q_proj and
k_proj within each head: output row h·d + 2i + j (pair i, element j) takes input row h·d + j·d/2 + i, for
head h of size d. transformers' GGUF loader undoes exactly this. Qwen2 uses the NeoX (half) layout in
llama.cpp too, so its rows stay as stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import torch

from lorakit.errors import LorakitError

# transformers model_type → llama.cpp architecture.
ARCHITECTURES = {
    "llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
}
# Names that name no parameter (rotary caches some old checkpoints saved).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Architecture:
    """One model's GGUF description, read from its config.json."""

    model_type: str
    arch: gguf.MODEL_ARCH
    config: dict[str, Any]
    tied_embeddings: bool

    @property
    def name(self) -> str:
        """llama.cpp's `general.architecture` string ("llama", "qwen2")."""
        return gguf.MODEL_ARCH_NAMES[self.arch]

    @property
    def heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def kv_heads(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.heads)

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.config["hidden_size"] // self.heads)

    @cached_property
    def _names(self) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.arch, int(self.config["num_hidden_layers"]))

    def gguf_name(self, name: str) -> str | None:
        """The GGUF name of a checkpoint tensor, or None for one that is not a parameter (rotary caches).

        Raises LorakitError for a tensor the architecture does not have in GGUF.
        """
        if name.endswith(_IGNORED_SUFFIXES):
            return None
        mapped = self._names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise LorakitError(f"tensor {name!r} has no GGUF name in llama.cpp's {self.name!r} architecture")
        return mapped

    def row_order(self, gguf_name: str, rows: int) -> torch.Tensor | None:
        """For q/k projections of the `llama` architecture, the stored row each GGUF row takes (see the
        module docstring); None for every other tensor."""
        if self.arch != gguf.MODEL_ARCH.LLAMA:
            return None
        if ".attn_q." in gguf_name:
            heads = self.heads
        elif ".attn_k." in gguf_name:
            heads = self.kv_heads
        else:
            return None
        return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)

    def add_hyperparameters(self, writer: gguf.GGUFWriter) -> None:
        """The `<arch>.*` keys llama.cpp reads (and transformers maps back to the config)."""
        config = self.config
        writer.add_block_count(int(config["num_hidden_layers"]))
        writer.add_context_length(int(config["max_position_embeddings"]))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(self.heads)
        writer.add_head_count_kv(self.kv_heads)
        writer.add_rope_freq_base(float(rope_theta(config)))
        writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        writer.add_vocab_size(int(config["vocab_size"]))
        if self.arch == gguf.MODEL_ARCH.LLAMA:
            writer.add_rope_dimension_count(self.head_dim)
        if self.head_dim != int(config["hidden_size"]) // self.heads:
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)


def rope_theta(config: dict[str, Any]) -> float:
    """RoPE base: transformers 5 keeps it in rope_parameters, older configs at the top level."""
    parameters = config.get("rope_parameters") or {}
    return parameters.get("rope_theta", config.get("rope_theta", 10000.0))


def describe(directory: Path) -> Architecture:
    """Read `directory/config.json` and refuse, in one line, what the GGUF export cannot represent."""
    file = directory / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LorakitError(f"{file}: not found; expected a transformers model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LorakitError(f"{file}: not valid JSON ({err})") from None
    model_type = config.get("model_type")
    named = ", ".join(config.get("architectures") or []) or "no architectures entry"
    if model_type not in ARCHITECTURES:
        raise LorakitError(f"{file}: architecture {model_type!r} ({named}) cannot be exported to GGUF; "
                           f"lorakit exports {', '.join(ARCHITECTURES)}")
    if config.get("quantization_config"):
        raise LorakitError(f"{file}: the model is quantized; export the unquantized model")
    parameters = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default":
        raise LorakitError(f"{file}: rope_type {rope_type!r} is not exported to GGUF yet (only 'default')")
    if model_type != "qwen2" and (config.get("attention_bias") or config.get("mlp_bias")):
        raise LorakitError(f"{file}: {model_type} with attention_bias/mlp_bias is not exported to GGUF "
                           "(transformers' GGUF loader would drop the biases)")
    tied = bool(config.get("tie_word_embeddings", False))
    return Architecture(model_type, ARCHITECTURES[model_type], config, tied)
