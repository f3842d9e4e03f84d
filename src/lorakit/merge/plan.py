"""The merge plan: which base tensors the adapters change, and how; and the maths for one tensor.

A plan maps output tensor names to a list of operations (adapter tensor keys and numbers only), built
and validated before any weight is read. `merged_blocks` evaluates it for one tensor with the float32
maths of `lorakit.merge.delta` and rounds once, so the streaming merge and its verification agree, and
both agree with the in-memory `merge_and_unload`:

    W' = round( DoRAₙ(… DoRA₁(R + w₁s₁ΔW₁) …) )   with R the base tensor (or the adapter's saved copy),

where each step is either W + wᵢsᵢΔWᵢ (LoRA) or m · (W + sᵢΔWᵢ) / ‖W + sᵢΔWᵢ‖_c (DoRA, after the
previous adapters). lora_bias adds wᵢsᵢ·b to the base bias.

Tied weights (lm_head sharing embed_tokens, absent from the checkpoint): a saved base tensor
(`base_layer.weight`) is loaded into the shared parameter, so both keep it; but LoRA and modules_to_save
act on one module only, so when they touch a tied group every member is written explicitly and the
config's tie_word_embeddings is turned off — the merged model then computes what the adapter model does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorakit.errors import AdapterFileError
from lorakit.io.checkpoint import Checkpoint, TensorInfo
from lorakit.io.memory import run_forked
from lorakit.merge.adapter_file import AdapterFile, LoraModule, SavedTensor
from lorakit.merge.delta import add_delta, dora_merge, lora_delta

# Architectures whose linear layers are transformers' Conv1D (weight stored (in, out)); used only when
# the architecture cannot be instantiated on the meta device to look.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
# Elements per block of rows computed at once (16 MB of float32 per temporary).
BLOCK_ELEMENTS = 2**22


@dataclass(frozen=True)
class LoraOp:
    """Add (or DoRA-merge) adapter `adapter`'s update of `module`, scaling already multiplied by its
    weight."""

    adapter: int
    module: str
    lora_A: str
    lora_B: str
    scaling: float
    transpose: bool
    feature_axis: int
    magnitude: str | None = None


@dataclass(frozen=True)
class BiasOp:
    """lora_bias: add scaling · lora_B.bias to the base bias."""

    adapter: int
    key: str
    scaling: float


@dataclass(frozen=True)
class ReplaceOp:
    """Start from the adapter's saved tensor instead of the base's."""

    adapter: int
    key: str


Op = LoraOp | BiasOp | ReplaceOp


@dataclass
class TensorPlan:
    name: str
    source: str
    ops: list[Op] = field(default_factory=list)

    @property
    def merged(self) -> bool:
        return any(not isinstance(op, ReplaceOp) for op in self.ops)


@dataclass(frozen=True)
class BaseModel:
    """What the merge needs of the base architecture beyond its checkpoint, read from config.json and a
    model instantiated on the meta device (no memory): Conv1D modules, tied parameters, name prefix."""

    config: dict[str, Any]
    conv1d: frozenset[str] | None
    tie_groups: tuple[tuple[str, ...], ...] = ()
    prefix: str = ""

    def is_conv1d(self, module: str, fan_in_fan_out: bool) -> bool:
        if self.conv1d is not None:
            # Names may differ by the base-model prefix (a headless checkpoint or adapter).
            bare = module.removeprefix(f"{self.prefix}.") if self.prefix else module
            return bool({module, bare, f"{self.prefix}.{bare}"} & self.conv1d)
        return self.config.get("model_type") in CONV1D_MODEL_TYPES or fan_in_fan_out


def describe_base(directory: Path, config: dict[str, Any]) -> BaseModel:
    """The base's Conv1D modules, tied parameters and prefix, looked up in a forked child (`run_forked`):
    the modeling code it imports would otherwise stay resident (~100 MB) through a streaming merge."""
    facts = run_forked(_model_facts, directory)
    if facts is None:  # custom/unknown architectures: config-only rules
        return BaseModel(config, conv1d=None)
    conv1d, tie_groups, prefix = facts
    return BaseModel(config, conv1d=frozenset(conv1d), tie_groups=tie_groups, prefix=prefix)


def _model_facts(directory: Path) -> tuple[list[str], tuple[tuple[str, ...], ...], str] | None:
    """(Conv1D module names, tied parameter groups, base-model prefix), or None if the architecture
    cannot be built on the meta device."""
    try:
        model = _meta_model(directory)
    except Exception:  # noqa: BLE001 - custom/unknown architectures
        return None
    from lorakit.layers import is_conv1d

    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return ([name for name, module in model.named_modules() if is_conv1d(module)],
            tuple(tuple(names) for names in groups.values() if len(names) > 1),
            getattr(model, "base_model_prefix", "") or "")


def _meta_model(directory: Path) -> torch.nn.Module:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    architecture = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(architecture, type):
                return architecture(config)
            return AutoModelForCausalLM.from_config(config)
    finally:
        transformers.logging.set_verbosity(verbosity)


@dataclass
class MergePlan:
    checkpoint: Checkpoint
    adapters: list[AdapterFile]
    tensors: dict[str, TensorPlan]
    untie_embeddings: bool = False

    def outputs(self) -> Iterator[tuple[str, TensorInfo]]:
        """(output name, base tensor it starts from), in checkpoint order; explicit tied copies last."""
        yield from self.checkpoint.tensors.items()
        for name, plan in self.tensors.items():
            if name not in self.checkpoint.tensors:
                yield name, self.checkpoint.tensors[plan.source]


class _Names:
    """Model parameter names → checkpoint tensor names (a headless checkpoint drops the prefix;
    a tied parameter absent from the checkpoint lives in its group's stored member)."""

    def __init__(self, checkpoint: Checkpoint, base: BaseModel) -> None:
        self.stored_names = checkpoint.tensors
        self.prefix = f"{base.prefix}." if base.prefix else ""
        self.groups = {name: group for group in base.tie_groups for name in group}

    def direct(self, param: str) -> str | None:
        candidates = [param]
        if self.prefix:
            prefixed = param.startswith(self.prefix)
            candidates.append(param[len(self.prefix):] if prefixed else self.prefix + param)
        return next((name for name in candidates if name in self.stored_names), None)

    def resolve(self, param: str) -> tuple[str, bool] | None:
        """(stored name, whether `param` is a tied alias of it), or None."""
        stored = self.direct(param)
        if stored is not None:
            return stored, False
        member = next((self.direct(m) for m in self.groups.get(param, ()) if self.direct(m)), None)
        return (member, True) if member is not None else None

    def group_of(self, stored: str) -> tuple[str, ...]:
        return next((g for name, g in self.groups.items() if self.direct(name) == stored), ())


def build_plan(checkpoint: Checkpoint, base: BaseModel, adapters: Sequence[AdapterFile],
               weights: Sequence[float]) -> MergePlan:
    """Validate every adapter against the base checkpoint and plan the merge.

    Raises AdapterFileError naming the adapter file and module for anything that does not fit.
    """
    trained_bias = [a for a in adapters if a.config.bias != "none"]
    if len(trained_bias) > 1:
        first, second = trained_bias[:2]
        raise AdapterFileError(f"{second.directory}: only one adapter may carry trained biases "
                               f"(bias={second.config.bias!r}; {first.directory} does too)")
    planner = _Planner(checkpoint, base, adapters)
    for index, (adapter, weight) in enumerate(zip(adapters, weights)):
        modules, saved = adapter.layout()
        for tensor in saved:
            planner.add_saved(index, tensor)
        for module in modules:
            planner.add_module(index, module, weight)
    return planner.finish()


class _Planner:
    """The operations of every adapter, collected by what they touch, then turned into a `MergePlan`."""

    def __init__(self, checkpoint: Checkpoint, base: BaseModel, adapters: Sequence[AdapterFile]) -> None:
        self.checkpoint, self.base, self.adapters = checkpoint, base, adapters
        self.names = _Names(checkpoint, base)
        self.in_place: dict[str, list[Op]] = {}  # stored name → loads shared by every tied member
        self.own: dict[str, list[Op]] = {}  # model parameter name → operations on that parameter only
        self.resolved: dict[str, tuple[str, bool]] = {}
        self.whole: dict[str, int] = {}  # modules_to_save parameter → the adapter that replaces it

    def locate(self, adapter: AdapterFile, param: str, what: str) -> TensorInfo:
        found = self.names.resolve(param)
        if found is None:
            raise AdapterFileError(f"{adapter.file}: {what} is not in the base model "
                                   f"{self.checkpoint.directory} (no tensor {param!r}); is the adapter for "
                                   "another base model?")
        self.resolved[param] = found
        return self.checkpoint.tensors[found[0]]

    @staticmethod
    def check(adapter: AdapterFile, what: str, got: tuple[int, ...], info: TensorInfo) -> None:
        if tuple(got) != info.shape:
            raise AdapterFileError(f"{adapter.file}: {what}: the adapter gives shape {tuple(got)} but the "
                                   f"base tensor {info.name!r} has shape {info.shape}; is the adapter for "
                                   "another base model?")

    def add_saved(self, index: int, tensor: SavedTensor) -> None:
        """A whole tensor: loaded in place, or (modules_to_save) replacing that parameter only."""
        adapter = self.adapters[index]
        info = self.locate(adapter, tensor.param, f"saved tensor {tensor.key!r}")
        self.check(adapter, f"saved tensor {tensor.key!r}", adapter.shapes[tensor.key], info)
        if not tensor.whole_module:
            self.in_place.setdefault(info.name, []).append(ReplaceOp(index, tensor.key))
            return
        if self.whole.setdefault(tensor.param, index) != index:
            other = self.adapters[self.whole[tensor.param]].directory
            raise AdapterFileError(f"{adapter.file}: {tensor.param!r} is also saved (modules_to_save) by "
                                   f"{other}; merge such adapters one at a time")
        self.own.setdefault(tensor.param, []).append(ReplaceOp(index, tensor.key))

    def add_module(self, index: int, module: LoraModule, weight: float) -> None:
        """A module's LoRA update (with DoRA magnitude, lora_bias), scaled by the adapter's merge weight."""
        adapter = self.adapters[index]
        if module.magnitude is not None and weight != 1.0:
            raise AdapterFileError(f"{adapter.directory}: DoRA adapters cannot be weighted (weight "
                                   f"{weight}); the magnitude rescaling is not linear in the update")
        param = f"{module.name}.weight"
        info = self.locate(adapter, param, f"module {module.name!r}")
        a, b = adapter.shapes[module.lora_A], adapter.shapes[module.lora_B]
        transpose = module.embedding or self.base.is_conv1d(module.name, adapter.config.fan_in_fan_out)
        self.check(adapter, f"module {module.name!r}", (a[1], b[0]) if transpose else (b[0], a[1]), info)
        axis = 1 if transpose else 0
        if module.magnitude is not None:
            self.check(adapter, f"module {module.name!r} magnitude", adapter.shapes[module.magnitude],
                       TensorInfo(info.name, info.file, info.dtype, (info.shape[axis],)))
        scaling = adapter.scaling(module.name) * weight
        self.own.setdefault(param, []).append(
            LoraOp(index, module.name, module.lora_A, module.lora_B, scaling, transpose, axis,
                   module.magnitude))
        if module.lora_bias is not None:
            bias = f"{module.name}.bias"
            if self.names.direct(bias) is None:
                raise AdapterFileError(f"{adapter.file}: module {module.name!r} has a lora_B.bias but the "
                                       f"base has no {bias!r}")
            bias_info = self.locate(adapter, bias, f"bias of {module.name!r}")
            self.check(adapter, f"module {module.name!r} lora_B.bias", adapter.shapes[module.lora_bias],
                       bias_info)
            self.own.setdefault(bias, []).append(BiasOp(index, module.lora_bias, scaling))

    def finish(self) -> MergePlan:
        """Turn per-parameter operations into per-output-tensor plans, untying groups the adapters split."""
        names, resolved = self.names, self.resolved
        tensors: dict[str, TensorPlan] = {}
        untie = False
        by_stored: dict[str, dict[str, list[Op]]] = {}
        for param, ops in self.own.items():
            by_stored.setdefault(resolved[param][0], {})[param] = ops
        for stored in dict.fromkeys([*self.in_place, *by_stored]):
            shared = self.in_place.get(stored, [])
            members = by_stored.get(stored, {})
            group = names.group_of(stored)
            absent = [m for m in group if names.direct(m) is None]
            direct = [op for param, ops in members.items() if not resolved[param][1] for op in ops]
            if absent and members:
                # The adapters change the members differently: write each absent member explicitly.
                untie = True
                for alias in absent:
                    tensors[alias] = TensorPlan(alias, stored, _ordered(shared + members.get(alias, [])))
            elif group and members and self.base.config.get("tie_word_embeddings", False):
                untie = True  # every member is stored and one now differs: keep transformers from re-tying
            if shared or direct:
                tensors[stored] = TensorPlan(stored, stored, _ordered(shared + direct))
        return MergePlan(self.checkpoint, list(self.adapters), tensors, untie)


def _ordered(ops: list[Op]) -> list[Op]:
    """Loads first (as loading happens before merging), then the updates in adapter order."""
    return sorted(ops, key=lambda op: (not isinstance(op, ReplaceOp), op.adapter))


def target_dtype(stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """Output dtype of one tensor: converted only when it is floating point and a dtype was asked for."""
    return requested if requested is not None and stored.is_floating_point else stored


def merged_blocks(base: Tensor, plan: TensorPlan | None, adapters: Sequence[AdapterFile],
                  dtype: torch.dtype) -> Iterator[Tensor]:
    """One output tensor, in `dtype`, as consecutive blocks of rows (dim 0): the base (a saved copy replaces
    it, cast to the base dtype as loading does), with the planned updates applied in float32 and rounded once.

    Rows are independent for LoRA (ΔW[rows] = s·B[rows]A, or s·(B A[:, rows])ᵀ when transposed), biases and
    row-wise DoRA norms, so temporaries stay at `BLOCK_ELEMENTS` however large the tensor (a 128k-token
    embedding). DoRA with column norms (Conv1D, embeddings) needs every row and takes the tensor whole.
    """
    current = base
    for op in plan.ops if plan is not None else ():
        if isinstance(op, ReplaceOp):
            current = adapters[op.adapter].get(op.key).to(base.dtype)
    updates = [op for op in plan.ops if not isinstance(op, ReplaceOp)] if plan is not None else []
    column_norms = any(isinstance(op, LoraOp) and op.magnitude is not None and op.feature_axis != 0
                       for op in updates)
    if current.dim() == 0 or column_norms:
        yield (_updated(current, updates, adapters, None) if updates else current).to(dtype)
        return
    step = max(1, BLOCK_ELEMENTS // max(1, math.prod(current.shape[1:])))
    for start in range(0, current.shape[0], step):
        rows = slice(start, start + step)
        # A copied tensor is converted block by block too: a dtype change never holds a second whole copy.
        yield (_updated(current[rows], updates, adapters, rows) if updates else current[rows]).to(dtype)


def _updated(weight: Tensor, updates: list[Op], adapters: Sequence[AdapterFile],
             rows: slice | None) -> Tensor:
    """`weight` (all rows, or the block `rows`) with the updates applied, in float32."""
    for op in updates:
        adapter = adapters[op.adapter]
        if isinstance(op, LoraOp):
            a, b = adapter.get(op.lora_A), adapter.get(op.lora_B)
            if rows is not None:
                a, b = (a[:, rows], b) if op.transpose else (a, b[rows])
            delta = lora_delta(a, b, op.scaling, op.transpose)
            if op.magnitude is not None:
                magnitude = adapter.get(op.magnitude)
                magnitude = magnitude if rows is None else magnitude[rows]
                weight, _ = dora_merge(weight, delta, magnitude, op.feature_axis)
            else:
                weight = add_delta(weight, delta)
        elif isinstance(op, BiasOp):
            bias = adapter.get(op.key).float()
            weight = add_delta(weight, op.scaling * (bias if rows is None else bias[rows]))
    return weight.float()
