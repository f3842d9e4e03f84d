"""Adapter-carrying layers, one layer type per file."""

from lorakit.layers.base import AdapterModule, AdapterSpec, LoraLayer, is_adapter_module
from lorakit.layers.embedding import LoraEmbedding
from lorakit.layers.linear import LoraLinear, is_conv1d, linear_features
from lorakit.layers.modules_to_save import ModulesToSaveWrapper
from lorakit.layers.rows import BASE_ROW, row_adapters

__all__ = [
    "BASE_ROW", "AdapterModule", "AdapterSpec", "is_adapter_module", "LoraEmbedding", "LoraLayer", "LoraLinear",
    "ModulesToSaveWrapper", "is_conv1d", "linear_features", "row_adapters",
]
