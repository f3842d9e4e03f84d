"""LoRA for `nn.Linear` and for transformers' GPT-2 style `Conv1D` (weight stored as (in, out)).

y = W x + b + s · B A dropout(x), with A: nn.Linear(in, r), B: nn.Linear(r, out) per adapter.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.init import LoraInit
from lorakit.layers import dora, mixed
from lorakit.layers.base import AdapterSpec, LoraLayer
from lorakit.layers.rows import mixed_rows_active, row_groups, rows_for_batch
from lorakit.layers.update import lora_update
from lorakit.merge.delta import lora_delta


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and kin): a linear layer whose weight is stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear-like module, whatever its weight layout or quantization."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return module.in_features, module.out_features


class InferencePlan(NamedTuple):
    """What a no-grad forward needs when every live adapter is plain LoRA, looked up once per state change."""

    factors: tuple[tuple[str, nn.Linear, nn.Linear], ...]
    """(name, A, B) of each live adapter; the scaling is read from `LoraLayer.scaling` at every call, since
    user
    code (and PEFT's `set_scale`) changes it in place."""
    dtype: torch.dtype | None
    """The factors' dtype; the plan applies when the input and the base output have it."""
    dropout: bool
    """Whether some factor has dropout (then the plan applies only in eval mode)."""


class LoraLinear(LoraLayer):
    """LoRA around a Linear-like base layer; `fan_in_fan_out` marks the (in, out) weight layout."""

    def __init__(self, base_layer: nn.Module, module_name: str = "", fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, module_name)
        self.fan_in_fan_out = fan_in_fan_out
        self.feature_axis = 1 if fan_in_fan_out else 0
        self.in_features, self.out_features = linear_features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self._state_changed()

    def _containers(self) -> list[nn.ModuleDict]:
        return [self.lora_A, self.lora_B, *super()._containers()]

    def _create(self, name: str, spec: AdapterSpec, init: LoraInit) -> None:
        device = _device_of(self.base_layer)
        dtype = spec.dtype or torch.float32
        a = nn.Linear(self.in_features, spec.r, bias=False, device=device, dtype=dtype)
        b = nn.Linear(spec.r, self.out_features, bias=spec.lora_bias, device=device, dtype=dtype)
        a.weight.copy_(init.lora_A)
        b.weight.copy_(init.lora_B)
        if b.bias is not None and spec.init is not False:
            b.bias.zero_()
        self.lora_A[name], self.lora_B[name] = a, b

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta_weight(self, name: str) -> Tensor:
        a, b = self.factors(name)
        return lora_delta(a.detach(), b.detach(), self.scaling[name], transpose=self.fan_in_fan_out)

    def _lora_bias_vector(self, name: str) -> Tensor:
        return self.lora_B[name].bias.detach()

    def _init_weight(self) -> Tensor:
        weight = self.base_weight().detach().float()
        return weight.T if self.fan_in_fan_out else weight

    def _store_init_weight(self, residual: Tensor) -> None:
        self._write_weight(residual.T if self.fan_in_fan_out else residual)

    def _state_changed(self) -> None:
        names = self._live_adapters()
        if any(n in self.lora_magnitude_vector or self.lora_bias[n] for n in names):
            self._plan = None
            return
        factors = tuple((n, self.lora_A[n], self.lora_B[n]) for n in names)
        dtypes = {a.weight.dtype for _, a, _ in factors}
        self._plan = InferencePlan(factors, dtypes.pop() if len(dtypes) == 1 else None,
                                   any(not isinstance(self.lora_dropout[n], nn.Identity) for n in names))

    # ---- forward ---------------------------------------------------------------------------------

    def takes_plain_path(self, x: Tensor, result: Tensor) -> bool:
        """Whether a forward with input x and base output `result` can take the plain no-grad path: no
        autograd, every live adapter plain LoRA (no DoRA, no lora_bias), no dropout to apply, one dtype
        throughout and no mixed-adapter rows.

        Generation and evaluation take it. At decode time a LoRA layer sees a handful of tokens, so its cost
        is per-op and per-line overhead rather than arithmetic: this path looks its modules up once per
        state change and makes no casts, and with one dtype its add is the single rounding of the general
        path, so both give the same numbers.
        """
        plan = self._plan
        return (plan is not None and not torch.is_grad_enabled() and not (plan.dropout and self.training)
                and (not plan.factors or plan.dtype == x.dtype == result.dtype) and not mixed_rows_active())

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.takes_plain_path(x, result):
            for name, lora_a, lora_b in self._plan.factors:
                result = lora_update(result, x, lora_a.weight, lora_b.weight, self.scaling[name])
            return result
        if self.disabled:
            return result
        rows = rows_for_batch(x.shape[0]) if self.r else None
        if rows is not None:
            return self._forward_rows(x, result, rows)
        adapted = result
        for name in self._live_adapters():
            adapted = self._adapted(name, x, adapted, result)
        # The sum is formed in the adapters' dtype (float32 by default) and rounded once to the base dtype,
        # as PEFT does: rounding the update to float16/bfloat16 before adding would round twice.
        return adapted.to(result.dtype)

    def _forward_rows(self, x: Tensor, result: Tensor, rows: tuple[str, ...]) -> Tensor:
        """A mixed-adapter batch: row i adapted by `rows[i]`."""
        if self.merged_adapters:
            raise ValueError(f"{self.module_name}: adapter_names cannot be used while adapters are merged")
        # Plain LoRA rows all at once in batched matmuls (layers/mixed.py); the rows it leaves (DoRA; in
        # training, dropout or gradients) take the per-adapter path.
        result, rows = mixed.add_linear_rows(self, x, result, rows)
        for name, index in row_groups(rows, x.device):
            if name in self.r:
                base_rows = result.index_select(0, index)
                sub = self._adapted(name, x.index_select(0, index), base_rows, base_rows)
                result = result.index_copy(0, index, sub.to(result.dtype))
        return result

    def _adapted(self, name: str, x: Tensor, so_far: Tensor, result: Tensor) -> Tensor:
        """`so_far` (the output with earlier adapters applied) plus adapter `name`'s term for input x, in the
        adapter's dtype; `result` is the base layer's output, which DoRA rescales."""
        lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        scaling = self.scaling[name]
        x = x.to(lora_a.weight.dtype)
        if name in self.lora_magnitude_vector:
            return so_far + self._dora_term(name, x, result)
        # Without dropout (p = 0, the usual case) the identity module is not even called: per-op overhead
        # is most of a LoRA layer's cost at decode time.
        out = lora_update(so_far, x if isinstance(dropout, nn.Identity) else dropout(x), lora_a.weight,
                          lora_b.weight, scaling)
        return out if lora_b.bias is None else out + scaling * lora_b.bias

    def _dora_term(self, name: str, x: Tensor, result: Tensor) -> Tensor:
        """DoRA's addition to the base output `result` (layers/dora.py): (m/‖W + s·BA‖_c) (W x + s·B A x) − W
        x,
        with x in the adapter's dtype."""
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        dropout, scaling = self.lora_dropout[name], self.scaling[name]
        lora_weight = lora_b.weight @ lora_a.weight
        weight = self.base_weight()
        if self.fan_in_fan_out:
            lora_weight = lora_weight.T
        magnitude = self.lora_magnitude_vector[name].weight
        scale = dora.magnitude_scale(weight, lora_weight, scaling, magnitude, self.feature_axis)
        if isinstance(dropout, nn.Identity) or not self.training:
            # W x = result − b, subtracted in the base dtype as PEFT does, so both give the same numbers.
            bias = getattr(self.base_layer, "bias", None)
            base_out = (result if bias is None else result - bias.to(result.dtype)).to(x.dtype)
        else:
            x = dropout(x)
            weight = weight.to(x.dtype)
            base_out = F.linear(x, weight.T if self.fan_in_fan_out else weight)
        return dora.linear_term(
            base_out, lora_update(base_out, x, lora_a.weight, lora_b.weight, scaling), scale
        )


def _device_of(module: nn.Module) -> torch.device:
    """Where a base layer computes: its weight's device, or accelerate's execution device if offloaded."""
    weight = getattr(module, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device) if device is not None else torch.device("cpu")
