"""The `README.md` model card `save_pretrained` writes next to an adapter, as PEFT does.

The card is YAML metadata between `---` lines followed by markdown. The metadata the Hub reads for
adapters: `library_name: peft` (the format, which lorakit writes), `base_model` (when the model was loaded
from a name or path) and `tags` (`base_model:adapter:<base>`, `lora`, and `transformers` for a transformers
model). An existing card is kept: its other metadata and its text stay, the tags are merged.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from lorakit.config import LoraConfig
from lorakit.io.atomic import atomic_write_text

CARD_NAME = "README.md"
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n?", re.DOTALL)


def _split(text: str) -> tuple[dict[str, Any], str]:
    match = _FRONT_MATTER.match(text)
    if match is None:
        return {}, text
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        return {}, text
    return (meta if isinstance(meta, dict) else {}), text[match.end() :]


def _training_section(configs: dict[str, LoraConfig]) -> str:
    lines = ["## Training procedure", ""]
    for name, config in configs.items():
        lines.append(
            f"- adapter `{name}`: LoRA r={config.r}, lora_alpha={config.lora_alpha}, "
            f"lora_dropout={config.lora_dropout}, target_modules={config.target_modules}"
            + (", DoRA" if config.use_dora else "")
        )
    return "\n".join(lines) + "\n"


def write_model_card(directory: Path, model: nn.Module, configs: dict[str, LoraConfig]) -> None:
    """Write or update `directory/README.md` for the adapters `configs` of `model` (the transformers model).

    The base model is taken from `model.config._name_or_path` (a model built in code without a name has
    none and the card names none).
    """
    path = directory / CARD_NAME
    meta, body = _split(path.read_text(encoding="utf-8")) if path.is_file() else ({}, "")
    model_config = getattr(model, "config", None)
    base = getattr(model, "name_or_path", None) or getattr(model_config, "_name_or_path", None)
    meta["library_name"] = "peft"
    tags = list(meta.get("tags") or [])
    if base:
        meta["base_model"] = base
        tags.append(f"base_model:adapter:{base}")
    tags.append("lora")
    if model_config is not None and hasattr(model_config, "to_dict"):
        tags.append("transformers")
    meta["tags"] = list(dict.fromkeys(tags))
    if not body.strip():
        body = (
            "\n# Model card\n\nA LoRA adapter trained with lorakit, saved in PEFT's format.\n\n"
            + _training_section(configs)
        )
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    atomic_write_text(path, f"---\n{front}\n---\n{body}")
