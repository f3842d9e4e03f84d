"""What every adapter-carrying layer shares: adapters held by name, activation, merge bookkeeping.

A LoRA layer wraps the original module as `base_layer` and adds, per adapter name, the low-rank factors
(`lora_A`/`lora_B` or `lora_embedding_A`/`lora_embedding_B`), a dropout and, for DoRA, a
`lora_magnitude_vector`. These attribute names are PEFT's, so parameter names such as
`...q_proj.lora_A.default.weight` are the ones user code (custom optimizers, LoRA+) already selects by.

Mixed-adapter batches (each row its own adapter) are described in layers/rows.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lorakit.init import Initialiser, LoraInit, init_zeros, moves_base_weight
from lorakit.io.peft_keys import LINEAR_FACTORS
from lorakit.layers.rows import StackSlot
from lorakit.layers.tuner_api import TunerLayerAPI
from lorakit.merge.delta import add_delta, dora_merge, dora_norm, dora_unmerge
from lorakit.quant import weights as quant


@runtime_checkable
class AdapterModule(Protocol):
    """The interface lorakit finds adapter-carrying modules by (LoRA layers and modules_to_save)."""

    def adapter_names(self) -> list[str]: ...

    def set_active(self, names: Sequence[str]) -> None: ...

    def set_disabled(self, disabled: bool) -> None: ...

    def delete_adapter(self, name: str) -> None: ...

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]: ...

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        """Adapter `name`'s tensors under their PEFT on-disk names, relative to this module."""
        ...


_ADAPTER_CLASSES: dict[type, bool] = {}


def is_adapter_module(module: object) -> bool:
    """`isinstance(module, AdapterModule)`, remembered per class.

    A runtime Protocol check walks the protocol's members on every call; done for every module of a model
    several times per `set_adapter`, it made a switch take ~150 ms with 10 adapters on a 30-layer model.
    The answer depends only on the class (the members are methods), so it is computed once per class.
    """
    cls = type(module)
    answer = _ADAPTER_CLASSES.get(cls)
    if answer is None:
        answer = _ADAPTER_CLASSES[cls] = isinstance(module, AdapterModule)
    return answer


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's settings for one module, resolved from LoraConfig (rank/alpha patterns applied)."""

    r: int
    alpha: float
    scaling: float
    dropout: float = 0.0
    init: bool | str = True
    use_dora: bool = False
    lora_bias: bool = False
    dtype: torch.dtype | None = None


class LoraLayer(TunerLayerAPI, nn.Module):
    """Base of the LoRA layers. Subclasses define the factor modules and the forward pass.

    `feature_axis` is the axis of the stored base weight that indexes output features (0 for
    nn.Linear's (out, in), 1 for Conv1D's (in, out) and Embedding's (num_embeddings, dim)).
    """

    feature_axis: int = 0
    _disk_names: tuple[str, str] = LINEAR_FACTORS

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # A0 and B0 of adapters whose init moved the base weight (OLoRA, PiSSA), kept on the CPU so that
        # saving can write an adapter for the untouched base.
        self.initial_factors: dict[str, tuple[Tensor, Tensor]] = {}
        self._dora_norms: dict[str, Tensor] = {}
        # The adapters' factors stacked side by side for mixed-adapter batches (layers/mixed.py).
        self.row_stack = StackSlot()

    # ---- what subclasses provide -----------------------------------------------------------------

    @property
    def weight(self) -> Tensor:
        """The stored base weight (a Parameter of `base_layer`; bitsandbytes codes for a quantized layer)."""
        return self.base_layer.weight

    def base_weight(self) -> Tensor:
        """The base weight as float numbers, in the stored layout: the Parameter itself, or for a
        bitsandbytes-quantized base a new float32 tensor with its dequantized values (`lorakit.quant`)."""
        if quant.is_quantized(self.base_layer):
            return quant.dequantize_weight(self.base_layer)
        return self.weight

    def _create(self, name: str, spec: AdapterSpec, init: LoraInit) -> None:
        raise NotImplementedError

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """(A, B) of adapter `name` as stored on disk by PEFT."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> Tensor:
        """ΔW of adapter `name` in float32, in the stored weight's layout."""
        raise NotImplementedError

    def _init_weight(self) -> Tensor:
        """The base weight as (out, in) float32, the layout the initialisers take."""
        raise NotImplementedError

    def _store_init_weight(self, residual: Tensor) -> None:
        """Write an (out, in) residual from an initialiser back into the stored layout and dtype."""
        raise NotImplementedError

    # ---- adapters by name ------------------------------------------------------------------------

    def adapter_names(self) -> list[str]:
        return list(self.r)

    def add_adapter(self, name: str, spec: AdapterSpec, initialise: Initialiser) -> None:
        """Create adapter `name`; `initialise(weight, r, scaling) -> LoraInit` chooses its start."""
        if name in self.r:
            raise ValueError(f"{self.module_name}: adapter {name!r} already exists")
        if moves_base_weight(spec.init) and self.initial_factors:
            # The base already holds another adapter's residual: a second OLoRA/PiSSA init would factor that
            # residual, and neither adapter would then be relative to the original weight.
            other = next(iter(self.initial_factors))
            raise ValueError(
                f"{self.module_name}: adapter {other!r} (OLoRA/PiSSA) already replaced the base weight by "
                f"its "
                f"residual; init_lora_weights={spec.init!r} for {name!r} would start from it. Save {other!r} "
                "(portable) and add the new adapter to a fresh base model"
            )
        self.r[name], self.lora_alpha[name], self.scaling[name] = spec.r, spec.alpha, spec.scaling
        self.lora_bias[name] = spec.lora_bias
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        with torch.no_grad():
            weight = self._init_weight()
            if weight.device.type == "meta":
                self._check_offloaded(spec)
            # Build the factor modules before initialising them, as PEFT does: their constructors draw from
            # torch's RNG first, so a seeded random init (Kaiming, Gaussian, randomized-SVD PiSSA) yields
            # PEFT's factors for the same seed.
            self._create(name, spec, init_zeros(weight, spec.r, spec.scaling))
            init = initialise(weight, spec.r, spec.scaling)
            for which, factor, value in zip("AB", self.factors(name), init[:2]):
                factor.copy_(self._factor_layout(which, factor, value))
            if init.residual is not None:
                self._store_init_weight(init.residual)
                self.initial_factors[name] = (
                    init.lora_A.detach().cpu().clone(),
                    init.lora_B.detach().cpu().clone(),
                )
            if spec.use_dora:
                self._create_magnitude(name)
        self._state_changed()

    def _check_offloaded(self, spec: AdapterSpec) -> None:
        """The base weight is offloaded (accelerate keeps it on the meta device and loads it only for the base
        layer's own forward): the default inits need only its shape, but these methods need its values."""
        needs = "DoRA (use_dora=True)" if spec.use_dora else (
            f"init_lora_weights={spec.init!r}" if moves_base_weight(spec.init) else None)
        if needs:
            raise ValueError(
                f"{self.module_name}: {needs} needs the base weight, but it is offloaded (meta device); "
                "load this layer into memory (a device_map without 'disk'/'meta' for it) or use another init"
            )

    def _check_in_memory(self, action: str) -> None:
        if self.weight.device.type == "meta":
            raise ValueError(
                f"{self.module_name}: cannot {action}: the base weight is offloaded (meta device); "
                "load the model without disk/meta offloading to merge"
            )

    def _factor_layout(self, which: str, factor: Tensor, value: Tensor) -> Tensor:
        """An initialiser's A (r, in) or B (out, r) (`which`: "A" or "B") in the layout of the factor's
        weight."""
        return value.view_as(factor)

    def _magnitude_layout(self, norm: Tensor) -> Tensor:
        """DoRA's magnitude (one value per output feature) in the shape PEFT stores for this layer."""
        return norm

    def _dora_delta(self, name: str) -> Tensor:
        """s · ΔW as DoRA's initial norm ‖W + s·ΔW‖ sees it (float32, the base weight's layout)."""
        return self.delta_weight(name)

    def _create_magnitude(self, name: str) -> None:
        delta = self._dora_delta(name)
        norm = dora_norm(add_delta(self.base_weight(), delta), self.feature_axis)
        module = nn.Module()
        magnitude = self._magnitude_layout(norm).to(device=delta.device, dtype=self._adapter_dtype(name))
        module.weight = nn.Parameter(magnitude)
        self.lora_magnitude_vector[name] = module

    def _adapter_dtype(self, name: str) -> torch.dtype:
        return next(self.adapter_parameters(name)).dtype

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"{self.module_name}: unmerge adapter {name!r} before deleting it")
        for container in self._containers():
            if name in container:
                del container[name]
        for table in (
            self.r,
            self.lora_alpha,
            self.scaling,
            self.lora_bias,
            self.initial_factors,
            self._dora_norms,
        ):
            table.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self._state_changed()

    def _containers(self) -> list[nn.ModuleDict | nn.ParameterDict]:
        return [self.lora_dropout, self.lora_magnitude_vector]

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        a, b = self.factors(name)
        state = {self._disk_names[0]: a, self._disk_names[1]: b}
        if self.lora_bias.get(name):
            state["lora_B.bias"] = self.lora_B[name].bias
        if name in self.lora_magnitude_vector:
            state["lora_magnitude_vector"] = self.lora_magnitude_vector[name].weight
        return state

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for container in self._containers():
            if name in container:
                item = container[name]
                if isinstance(item, nn.Parameter):
                    yield item
                else:
                    yield from item.parameters()

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = [n for n in names if n in self.r]
        self._state_changed()

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled
        self._state_changed()

    def _state_changed(self) -> None:
        """Called after adapters are added, deleted, activated, disabled, merged or unmerged, for subclasses
        that
        keep state derived from those (LoraLinear's inference plan)."""

    def _live_adapters(self) -> list[str]:
        """Active adapters whose update is not already merged into the base weight."""
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    # ---- merge -----------------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters' updates into the base weight: float32 maths, one rounding at the end.

        With `safe_merge`, the result is checked for NaN/inf before the base weight is touched.
        """
        names = [n for n in (adapter_names if adapter_names is not None else self.active_adapters)
                 if n in self.r and n not in self.merged_adapters]
        if not names:
            return
        self._check_in_memory("merge")
        self._warn_if_requantized("merge")
        merged = self.base_weight().detach().float()
        bias = self._bias_after(names, sign=1.0)
        for name in names:
            delta = self.delta_weight(name)
            if name in self.lora_magnitude_vector:
                magnitude = self.lora_magnitude_vector[name].weight.detach()
                merged, self._dora_norms[name] = dora_merge(merged, delta, magnitude, self.feature_axis)
            else:
                merged = add_delta(merged, delta)
        if safe_merge and not (torch.isfinite(merged).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(
                f"{self.module_name}: merging adapter(s) {names} gives NaN/inf weights; the adapter seems "
                f"broken"
            )
        self._write_weight(merged)
        if bias is not None:
            with torch.no_grad():
                self.base_layer.bias.copy_(bias)
        self.merged_adapters.extend(names)
        self._state_changed()

    def unmerge(self) -> None:
        """Subtract every merged update again (in reverse order), restoring the base weight."""
        if not self.merged_adapters:
            return
        self._check_in_memory("unmerge")
        self._warn_if_requantized("unmerge")
        weight = self.base_weight().detach().float()
        bias = self._bias_after(self.merged_adapters, sign=-1.0)
        for name in reversed(self.merged_adapters):
            delta = self.delta_weight(name)
            if name in self.lora_magnitude_vector:
                magnitude = self.lora_magnitude_vector[name].weight.detach()
                weight = dora_unmerge(weight, delta, magnitude, self._dora_norms.pop(name), self.feature_axis)
            else:
                weight = weight - delta
        self._write_weight(weight)
        if bias is not None:
            with torch.no_grad():
                self.base_layer.bias.copy_(bias)
        self.merged_adapters = []
        self._state_changed()

    def _bias_after(self, names: Sequence[str], sign: float) -> Tensor | None:
        """Base bias with ± s · lora_B.bias of the adapters that have one (None if none do)."""
        with_bias = [n for n in names if self.lora_bias.get(n)]
        if not with_bias:
            return None
        if getattr(self.base_layer, "bias", None) is None:
            raise ValueError(f"{self.module_name}: cannot merge lora_bias into a base layer without a bias")
        bias = self.base_layer.bias.detach().float()
        for name in with_bias:
            bias = bias + sign * self.scaling[name] * self._lora_bias_vector(name).float()
        return bias

    def _lora_bias_vector(self, name: str) -> Tensor:
        raise NotImplementedError

    def _write_weight(self, weight: Tensor) -> None:
        if quant.is_quantized(self.base_layer):
            quant.requantize_weight_(self.base_layer, weight)
            return
        # copy_ keeps the storage, so weights tied to this one (embeddings ↔ lm_head) stay tied.
        with torch.no_grad():
            self.weight.copy_(weight)

    def _warn_if_requantized(self, action: str) -> None:
        if quant.is_quantized(self.base_layer):
            # The same text from the same line: Python shows it once per process, however many layers merge.
            warnings.warn(
                f"{action}: the base weights are quantized (bitsandbytes): the merged weights are quantized "
                "again, which rounds them (unmerging does not restore the original exactly)",
                stacklevel=2,
            )

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}" for n, r in self.r.items())
        return f"adapters=({ranks}), active={self.active_adapters}, merged={self.merged_adapters}"
