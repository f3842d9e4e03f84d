"""Activation (gradient) checkpointing of a transformers model, under the name the installed version has.

transformers 5.2x renamed `gradient_checkpointing_enable/disable` to `activation_checkpointing_enable/
disable` and warns (FutureWarning, removal in v6) on the old names; older 5.x releases have only the old
ones. lorakit calls whichever exists, so users see no warning they cannot act on.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def enable_activation_checkpointing(model: nn.Module, kwargs: dict[str, Any] | None = None) -> None:
    """Recompute each decoder layer's activations in the backward pass; `kwargs` go to
    `torch.utils.checkpoint` (e.g. {"use_reentrant": False})."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_activation_checkpointing(model: nn.Module) -> None:
    disable = getattr(model, "activation_checkpointing_disable", None)
    if disable is not None:
        disable()
    else:
        model.gradient_checkpointing_disable()
