"""LoRA around `nn.Conv1d`, `nn.Conv2d` and `nn.Conv3d` (PEFT's layout and numbers).

As in PEFT, A is a convolution with the base layer's kernel size, stride and padding from the input channels
to r channels, and B a 1×…×1 convolution from r to the output channels, so the update of input x is
s · B(A(dropout(x))) and ΔW[o, i, k…] = s · Σ_r B[o, r] A[r, i, k…] (B's weight flattened to (out, r),
A's to (r, in · prod(kernel))). On disk the factors are `lora_A.weight` (r, in, k…) and `lora_B.weight`
(out, r, 1…), PEFT's names and shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.init import LoraInit
from lorakit.layers.base import AdapterSpec, LoraLayer
from lorakit.layers.rows import row_groups, rows_for_batch

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BY_DIM = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


class LoraConv(LoraLayer):
    """LoRA around a 1-, 2- or 3-D convolution with groups=1 and dilation 1."""

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        # PEFT cannot merge grouped convolutions and its A ignores dilation (so its update would not be the
        # ΔW it saves); lorakit refuses both rather than compute something else.
        if base_layer.groups != 1 or any(d != 1 for d in base_layer.dilation):
            raise ValueError(
                f"{module_name}: LoRA on a {type(base_layer).__name__} needs groups=1 and dilation=1 "
                f"(got groups={base_layer.groups}, dilation={base_layer.dilation})"
            )
        super().__init__(base_layer, module_name)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _containers(self) -> list[nn.ModuleDict]:
        return [self.lora_A, self.lora_B, *super()._containers()]

    def _create(self, name: str, spec: AdapterSpec, init: LoraInit) -> None:
        if spec.use_dora:
            raise ValueError(f"{self.module_name}: DoRA (use_dora=True) is not supported on convolutions")
        base = self.base_layer
        conv = _BY_DIM[base.weight.dim()]
        ones = (1,) * (base.weight.dim() - 2)
        kwargs = {"device": base.weight.device, "dtype": spec.dtype or torch.float32}
        # Built in PEFT's order (A, then B) so that their constructors draw what PEFT's draw.
        a = conv(self.in_features, spec.r, base.kernel_size, base.stride, base.padding, bias=False, **kwargs)
        b = conv(spec.r, self.out_features, ones, ones, bias=spec.lora_bias, **kwargs)
        a.weight.copy_(init.lora_A.view_as(a.weight))
        b.weight.copy_(init.lora_B.view_as(b.weight))
        if b.bias is not None and spec.init is not False:
            b.bias.zero_()
        self.lora_A[name], self.lora_B[name] = a, b

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta_weight(self, name: str) -> Tensor:
        a, b = (t.detach().float() for t in self.factors(name))
        return (b.flatten(1) @ a.flatten(1)).view(self.weight.shape) * self.scaling[name]

    def _lora_bias_vector(self, name: str) -> Tensor:
        return self.lora_B[name].bias.detach()

    def _init_weight(self) -> Tensor:
        """(out, in · prod(kernel)): A's fan-in is the base kernel's, so the initialisers' draws match."""
        return self.base_weight().detach().float().flatten(1)

    def _store_init_weight(self, residual: Tensor) -> None:
        self._write_weight(residual.view(self.weight.shape))

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        rows = rows_for_batch(x.shape[0]) if self.r else None
        if rows is not None:
            if self.merged_adapters:
                raise ValueError(
                    f"{self.module_name}: adapter_names cannot be used while adapters are merged"
                )
            for name, index in row_groups(rows, x.device):
                if name in self.r:
                    sub = result.index_select(0, index) + self._update(name, x.index_select(0, index))
                    result = result.index_copy(0, index, sub.to(result.dtype))
            return result
        adapted = result
        for name in self._live_adapters():
            adapted = adapted + self._update(name, x)
        # Summed in the adapters' dtype and rounded once to the base dtype, as for linear layers.
        return adapted.to(result.dtype)

    def _update(self, name: str, x: Tensor) -> Tensor:
        """s · B(A(dropout(x))), in the adapter's dtype."""
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        return lora_b(lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype)))) * self.scaling[name]
