"""LoRA around `nn.Conv1d`, `nn.Conv2d` and `nn.Conv3d` (PEFT's layout and numbers).

As in PEFT, A is a convolution with the base layer's kernel size, stride and padding from the input channels
to r channels, and B a 1×…×1 convolution from r to the output channels, so the update of input x is
s · B(A(dropout(x))) and ΔW[o, i, k…] = s · Σ_r B[o, r] A[r, i, k…] (B's weight flattened to (out, r),
A's to (r, in · prod(kernel))). On disk the factors are `lora_A.weight` (r, in, k…) and `lora_B.weight`
(out, r, 1…), PEFT's names and shapes.

Grouped convolutions (groups g > 1, r a multiple of g) follow PEFT too: A sees every input channel and B
is grouped like the base (weight (out, r/g, 1…)), so output channel o only mixes the r/g rank channels of
its group. As in PEFT such an adapter cannot be merged, and the inits that move the base weight (OLoRA,
PiSSA) are refused on it. DoRA's norm there uses PEFT's matrix, B's weight viewed as (out/g, r) times A's as
(r, in · k…), reshaped to the base weight's shape: not the update's ΔW, but what PEFT computes, so that
grouped DoRA adapters give the same outputs in both libraries.

DoRA (Liu et al. 2024) as PEFT computes it for convolutions: with m the magnitude (stored (1, out, 1…)) and
n = ‖W + s·ΔW‖ per output channel (detached), the adapter adds (m/n − 1) · conv(x, W) + (m/n) · s · B(A(x)),
the bias not rescaled.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from lorakit.init import LoraInit, moves_base_weight
from lorakit.layers import dora
from lorakit.layers.base import AdapterSpec, LoraLayer
from lorakit.layers.rows import row_groups, rows_for_batch

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BY_DIM = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


class LoraConv(LoraLayer):
    """LoRA around a 1-, 2- or 3-D convolution with dilation 1."""

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        # PEFT's A ignores dilation, so its update would not be the ΔW it saves: refused rather than computed
        # as something else.
        if any(d != 1 for d in base_layer.dilation):
            raise ValueError(
                f"{module_name}: LoRA on a {type(base_layer).__name__} needs dilation=1 "
                f"(got dilation={base_layer.dilation})"
            )
        super().__init__(base_layer, module_name)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _containers(self) -> list[nn.ModuleDict]:
        return [self.lora_A, self.lora_B, *super()._containers()]

    def _create(self, name: str, spec: AdapterSpec, init: LoraInit) -> None:
        base = self.base_layer
        if base.groups > 1:
            self._check_grouped(spec)
        conv = _BY_DIM[base.weight.dim()]
        ones = (1,) * (base.weight.dim() - 2)
        kwargs = {"device": base.weight.device, "dtype": spec.dtype or torch.float32}
        # Built in PEFT's order (A, then B) so that their constructors draw what PEFT's draw.
        a = conv(self.in_features, spec.r, base.kernel_size, base.stride, base.padding, bias=False, **kwargs)
        b = conv(spec.r, self.out_features, ones, ones, groups=base.groups, bias=spec.lora_bias, **kwargs)
        a.weight.copy_(self._factor_layout("A", a.weight, init.lora_A))
        b.weight.copy_(self._factor_layout("B", b.weight, init.lora_B))
        if b.bias is not None and spec.init is not False:
            b.bias.zero_()
        self.lora_A[name], self.lora_B[name] = a, b

    def _check_grouped(self, spec: AdapterSpec) -> None:
        groups = self.base_layer.groups
        if spec.r % groups:
            raise ValueError(
                f"Targeting a {type(self.base_layer).__name__} with groups={groups} and rank {spec.r}. "
                "Currently, support is limited to conv layers where the rank is divisible by groups. "
                "Either choose a different rank or do not target this specific layer."
            )
        if moves_base_weight(spec.init):
            raise ValueError(f"{self.module_name}: init_lora_weights={spec.init!r} is not supported on a "
                             "convolution with groups > 1")
        warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.",
                      UserWarning, stacklevel=4)

    def _factor_layout(self, which: str, factor: Tensor, value: Tensor) -> Tensor:
        """A grouped B keeps, of the initialiser's dense (out, r) matrix, each output channel's own group."""
        groups = self.base_layer.groups
        if which == "A" or groups == 1:
            return value.view_as(factor)
        out, r = value.shape
        blocks = value.reshape(groups, out // groups, groups, r // groups)
        return torch.stack([blocks[g, :, g] for g in range(groups)]).reshape(factor.shape)

    def _dora_direction(self, name: str) -> Tensor:
        """B·A as DoRA's norm sees it, unscaled, in the base weight's shape (module docstring)."""
        a, b = self.factors(name)
        r = a.shape[0]
        return (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(self.weight.shape)

    def _dora_delta(self, name: str) -> Tensor:
        return self._dora_direction(name).detach().float() * self.scaling[name]

    def _magnitude_layout(self, norm: Tensor) -> Tensor:
        return norm.view(1, -1, *([1] * (self.weight.dim() - 2)))

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta_weight(self, name: str) -> Tensor:
        if self.base_layer.groups > 1:
            raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")
        a, b = (t.detach().float() for t in self.factors(name))
        return (b.flatten(1) @ a.flatten(1)).view(self.weight.shape) * self.scaling[name]

    def _lora_bias_vector(self, name: str) -> Tensor:
        return self.lora_B[name].bias.detach()

    def _init_weight(self) -> Tensor:
        """(out, in · prod(kernel)): A's fan-in is the base kernel's, so the initialisers' draws match. A
        grouped base's weight has in/g input channels; A sees all `in`, and only the shape matters to the
        inits allowed there."""
        weight = self.base_weight().detach().float().flatten(1)
        groups = self.base_layer.groups
        return weight if groups == 1 else weight.new_zeros(weight.shape[0], weight.shape[1] * groups)

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
                    base_rows = result.index_select(0, index)
                    sub = base_rows + self._term(name, x.index_select(0, index), base_rows)
                    result = result.index_copy(0, index, sub.to(result.dtype))
            return result
        adapted = result
        for name in self._live_adapters():
            adapted = adapted + self._term(name, x, result)
        # Summed in the adapters' dtype and rounded once to the base dtype, as for linear layers.
        return adapted.to(result.dtype)

    def _term(self, name: str, x: Tensor, result: Tensor) -> Tensor:
        """What adapter `name` adds to the base output `result` for input x, in the adapter's dtype:
        s · B(A(dropout(x))), or DoRA's term (module docstring)."""
        lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        x = dropout(x.to(lora_a.weight.dtype))
        update = lora_b(lora_a(x)) * self.scaling[name]
        if name not in self.lora_magnitude_vector:
            return update
        lora_weight = self._dora_direction(name)
        magnitude, scaling = self.lora_magnitude_vector[name].weight, self.scaling[name]
        scale = dora.magnitude_scale(self.weight, lora_weight, scaling, magnitude, self.feature_axis)
        scale = scale.view(1, -1, *([1] * (x.dim() - 2)))
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = result.to(update.dtype) - (0 if bias is None else bias.view(scale.shape).to(update.dtype))
        else:  # the base output of the dropped-out input, as PEFT computes it
            base = self.base_layer._conv_forward(x, self.weight.to(x.dtype), None)
        return (scale - 1) * base + scale * update
