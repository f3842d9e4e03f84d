"""Initialisations that leave the base weight alone: PEFT's default (Kaiming-uniform A, zero B),
Gaussian A, and a fully random start (`init_lora_weights=False`, useful only for tests)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


class LoraInit(NamedTuple):
    """A (r, in), B (out, r), and the base weight to store instead of the original (None: unchanged)."""

    lora_A: Tensor
    lora_B: Tensor
    residual: Tensor | None = None


def _device(weight: Tensor) -> torch.device:
    """Where to create the factors: the weight's device, or the CPU for an offloaded weight (accelerate keeps
    it on the meta device, where only its shape is known); the layer then moves them to where it computes."""
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


def _kaiming_a(r: int, in_features: int, device: torch.device) -> Tensor:
    # The bound of nn.Linear's own init (kaiming-uniform with a=√5): U(-1/√in, 1/√in).
    a = torch.empty(r, in_features, device=device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a


def init_kaiming(weight: Tensor, r: int, scaling: float) -> LoraInit:
    """LoRA paper default: A ~ Kaiming-uniform, B = 0, so ΔW = 0 at step 0."""
    (out_features, in_features), device = weight.shape, _device(weight)
    return LoraInit(_kaiming_a(r, in_features, device), torch.zeros(out_features, r, device=device))


def init_gaussian(weight: Tensor, r: int, scaling: float) -> LoraInit:
    """A ~ N(0, 1/r²), B = 0 (PEFT's "gaussian")."""
    (out_features, in_features), device = weight.shape, _device(weight)
    a = torch.randn(r, in_features, device=device) / r
    return LoraInit(a, torch.zeros(out_features, r, device=device))


def init_random(weight: Tensor, r: int, scaling: float) -> LoraInit:
    """Both factors random as nn.Linear initialises them: ΔW ≠ 0 from the start."""
    (out_features, in_features), device = weight.shape, _device(weight)
    b = torch.empty(out_features, r, device=device).uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r))
    return LoraInit(_kaiming_a(r, in_features, device), b)


def init_embedding(weight: Tensor, r: int, scaling: float) -> LoraInit:
    """Embeddings (weight taken as (dim, num_embeddings)): A = 0, B ~ N(0, 1), as PEFT does.

    A multiplies a one-hot row selection, so a zero A keeps ΔW = 0 while B carries the randomness.
    """
    (out_features, in_features), device = weight.shape, _device(weight)
    return LoraInit(torch.zeros(r, in_features, device=device), torch.randn(out_features, r, device=device))


def init_zeros(weight: Tensor, r: int, scaling: float) -> LoraInit:
    """Placeholder factors for an adapter whose saved weights are about to be loaded."""
    (out_features, in_features), device = weight.shape, _device(weight)
    return LoraInit(torch.zeros(r, in_features, device=device), torch.zeros(out_features, r, device=device))
