"""LoRA for `nn.Embedding` (and subclasses such as Gemma's scaled word embedding).

PEFT stores the factors as raw parameters: A (r, num_embeddings), B (dim, r), so a token t adds
s · B @ A[:, t] to its embedding; ΔW = s · (B @ A)ᵀ in the (num_embeddings, dim) layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.init import LoraInit
from lorakit.io.peft_keys import EMBEDDING_FACTORS
from lorakit.layers import dora, mixed
from lorakit.layers.base import AdapterSpec, LoraLayer
from lorakit.layers.linear import _device_of
from lorakit.layers.rows import row_groups, rows_for_batch
from lorakit.merge.delta import lora_delta


class LoraEmbedding(LoraLayer):
    feature_axis = 1
    _disk_names = EMBEDDING_FACTORS

    def __init__(self, base_layer: nn.Embedding, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        # PEFT's names for the shapes the factors map between: token ids (in) to embedding vectors (out).
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _containers(self) -> list[nn.ModuleDict | nn.ParameterDict]:
        return [self.lora_embedding_A, self.lora_embedding_B, *super()._containers()]

    def _create(self, name: str, spec: AdapterSpec, init: LoraInit) -> None:
        if spec.lora_bias:
            raise ValueError(f"{self.module_name}: lora_bias is not supported on embedding layers")
        kwargs = {"device": _device_of(self.base_layer), "dtype": spec.dtype or torch.float32}
        # PEFT creates the embedding factors from torch.randn draws before initialising them; drawing the same
        # (then overwritten) numbers keeps a seeded init equal to PEFT's.
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(init.lora_A.shape).to(**kwargs))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(init.lora_B.shape).to(**kwargs))

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def delta_weight(self, name: str) -> Tensor:
        a, b = self.factors(name)
        return lora_delta(a.detach(), b.detach(), self.scaling[name], transpose=True)

    def _init_weight(self) -> Tensor:
        return self.weight.detach().float().T

    def _store_init_weight(self, residual: Tensor) -> None:
        self._write_weight(residual.T)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        rows = rows_for_batch(x.shape[0]) if self.r and x.dim() > 1 else None
        if rows is not None:
            if self.merged_adapters:
                raise ValueError(
                    f"{self.module_name}: adapter_names cannot be used while adapters are merged"
                )
            # Plain LoRA rows all at once in batched matmuls (layers/mixed.py); the rows it leaves (DoRA; in
            # training, dropout or gradients) take the per-adapter path below.
            result, rows = mixed.add_embedding_rows(self, x, result, rows)
            for name, index in row_groups(rows, x.device):
                if name in self.r:
                    sub = self._adapted(name, x.index_select(0, index), result.index_select(0, index))
                    result = result.index_copy(0, index, sub.to(result.dtype))
            return result
        adapted = result
        for name in self._live_adapters():
            adapted = self._adapted(name, x, adapted)
        # Computed in the adapters' dtype and rounded once to the base dtype, as PEFT does.
        return adapted.to(result.dtype)

    def _adapted(self, name: str, ids: Tensor, result: Tensor) -> Tensor:
        """`result` (the embeddings so far) with adapter `name` applied to token ids `ids`, in the
        adapter's dtype (or the wider of the two)."""
        base = self.base_layer
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        rows = F.embedding(
            ids, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        lora_out = rows @ b.T
        embed_scale = getattr(base, "embed_scale", None)
        if embed_scale is not None:
            # e.g. Gemma multiplies embeddings by √dim inside the layer; the update must follow.
            lora_out = lora_out * embed_scale.to(lora_out.dtype)
        scaling = self.scaling[name]
        if name not in self.lora_magnitude_vector:
            return result + lora_out * scaling
        magnitude = self.lora_magnitude_vector[name].weight
        scale = dora.magnitude_scale(self.weight, (b @ a).T, scaling, magnitude, self.feature_axis)
        return scale * result.to(scale.dtype) + scale * lora_out * scaling
