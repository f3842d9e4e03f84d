"""Mixed-adapter batches in one batched matmul: every row's LoRA term at once, whatever its adapter.

A batch whose rows use different adapters (`adapter_names=[...]`, see `base.row_adapters`) could run one
small matmul pair per distinct adapter on that adapter's rows (gather, compute, scatter back). With many
adapters per batch — a server mixing requests for 16 adapters — that is 16 tiny matmuls and 16 scatters
per layer per decoding step. Here the factors of the adapters in the batch are stacked once per layer:

    down[k] = A_kᵀ zero-padded to the largest rank R,   up[k] = s_k · B_kᵀ zero-padded,   slot 0 = zeros,

and row i uses slot k(i) (0 for "__base__" rows and for adapters this layer does not carry). For linear
layers the slots are laid side by side instead of gathered per row: with D = [down[1] … down[K]] (in, K·R)
and U = [up[1]; …; up[K]] (K·R, out),

    LoRA term = ((x · D) ⊙ M) · U,     M[i] = 1 on row i's own R columns, 0 elsewhere (all 0 for base rows)

two plain matmuls for any mix of adapters and ranks, and no per-row copy of the factors (gathering
A/B per row would copy rows × (in + out) × R floats per layer and decoding step). Embeddings gather
down[slot] at their token ids and use `bmm`. The padding and the mask add exact zeros, so each row
equals its per-adapter result up to float rounding.

Stacking costs a copy of every factor, so each layer keeps its stack (`LoraLayer.row_stack`, see
layers/rows.py for thread-safety), checked against the adapter set of the batch
and by a version of each factor: the tensor itself (held by weak reference, so a deleted adapter reloaded
under the same name never matches), its storage pointer and torch's in-place version counter (bumped by
optimizer steps, `copy_` while loading, `merge`-style writes). Prefill and every decoding step of a
generation hit the same entry. That check runs once per layer per forward or generate call (`RowBlock`):
adapters do not change in the middle of a call, and checking at every decoding step cost ~10 % of a
mixed-batch generation (benchmarks/bench_inference.py). Writes through `param.data` bypass torch's
version counter; code that edits factors that way and then runs a mixed batch must call
`layer.row_stack.clear()` first.

Rows this path does not take are left to the caller's per-adapter path: DoRA adapters (their magnitude
rescaling depends on the whole adapted weight, not on a per-row low-rank term) and, while training,
adapters with active dropout or factors that need gradients (the stacks are detached copies).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lorakit.layers.base import LoraLayer
from lorakit.layers.rows import BASE_ROW, RowBlock, current_block
from lorakit.layers.update import lora_update


@dataclass(eq=False)
class _Stack:
    """One layer's stacked factors for one adapter set; slot 0 is all zeros."""

    names: tuple[str, ...]
    sources: tuple[weakref.ref, ...]
    versions: tuple[tuple[int, int, float], ...]
    down: Tensor  # (slots, in, R): Aᵀ per slot (for embeddings (slots, num_embeddings, R))
    up: Tensor  # (slots, R, out): s · Bᵀ per slot
    bias: Tensor | None  # (slots, out): s · lora_B.bias per slot, None when no adapter in the set has one
    slots: dict[str, int]
    masks: dict[tuple[str, ...], tuple[Tensor, Tensor, tuple[str, ...]]] = field(default_factory=dict)
    """rows → (slot per row, the mask M, the rows left to the per-adapter path)"""
    cat: tuple[Tensor, Tensor] | None = None  # (D, U), made on first use
    checked_in: RowBlock | None = None
    """The call in which `fresh` last held (compared by identity: equal names are not the same call)..."""
    checked_mode: tuple[bool, bool] = (False, False)
    """...and its (grad mode, training): a change of either decides anew which adapters are stacked."""

    @property
    def rank(self) -> int:
        return self.down.shape[2]

    def side_by_side(self) -> tuple[Tensor, Tensor]:
        """(D, U) of the module docstring: slots 1..K of down and up, laid side by side."""
        if self.cat is None:
            k = self.down.shape[0] - 1
            self.cat = (self.down[1:].permute(1, 0, 2).reshape(self.down.shape[1], k * self.rank),
                        self.up[1:].reshape(k * self.rank, self.up.shape[2]))
        return self.cat

    def row_slots(
        self, rows: tuple[str, ...], device: torch.device
    ) -> tuple[Tensor, Tensor, tuple[str, ...]]:
        """(slot per row, the mask M, the rows left over) for a batch's rows; the same rows reuse them in
        every
        layer call. Left over: `rows` with the rows handled here turned into base rows, for the caller's
        per-adapter path."""
        found = self.masks.get(rows)
        if found is None:
            if len(self.masks) >= 64:  # generate() keeps one row list per call; bound the rare churn
                self.masks.clear()
            slot = torch.tensor([self.slots.get(n, 0) for n in rows], device=device)
            column_slot = torch.arange(len(self.names) * self.rank, device=device) // self.rank + 1
            mask = (column_slot.unsqueeze(0) == slot.unsqueeze(1)).to(self.down.dtype)
            left_over = tuple(BASE_ROW if n in self.slots else n for n in rows)
            found = self.masks[rows] = (slot, mask, left_over)
        return found

    def fresh(
        self, names: tuple[str, ...], tensors: Sequence[tuple[Tensor, ...]], scalings: Sequence[float]
    ) -> bool:
        if names != self.names:
            return False
        flat = [t for group in tensors for t in group]
        return (all(ref() is t for ref, t in zip(self.sources, flat))
                and _versions(flat, scalings, tensors) == self.versions)


def _versions(
    flat: Sequence[Tensor], scalings: Sequence[float], groups: Sequence[tuple[Tensor, ...]]
) -> tuple:
    # One scaling per adapter, repeated for each of its tensors so the tuple lines up with `flat`.
    per_tensor = [s for s, group in zip(scalings, groups) for _ in group]
    return tuple((t._version, t.data_ptr(), s) for t, s in zip(flat, per_tensor))


def _factor_tensors(layer: LoraLayer, name: str) -> tuple[Tensor, ...]:
    """A, B (as stored by PEFT) and, with lora_bias, B's bias."""
    a, b = layer.factors(name)
    bias = layer.lora_B[name].bias if layer.lora_bias.get(name) else None
    return (a, b) if bias is None else (a, b, bias)


def _stackable(layer: LoraLayer, name: str, tensors: tuple[Tensor, ...], grad: bool) -> bool:
    if name in layer.lora_magnitude_vector:
        return False
    if layer.training and not isinstance(layer.lora_dropout[name], nn.Identity):
        return False
    return not (grad and any(t.requires_grad for t in tensors))


def _stack(layer: LoraLayer, rows: Sequence[str]) -> _Stack | None:
    """The cached stack for the stackable adapters among `rows`, rebuilt if any of them changed."""
    grad = torch.is_grad_enabled()
    block = current_block()
    cached = layer.row_stack.stack
    mode = (grad, layer.training)
    if cached is not None:
        if block is not None and cached.checked_in is block and cached.checked_mode == mode:
            return cached
        cached.checked_in = None  # the check below may end early (no stackable adapter) and must not vouch
    names: list[str] = []
    tensors: list[tuple[Tensor, ...]] = []
    # Sorted: the same adapter set in another row order reuses the stack.
    for name in sorted(set(rows)):
        if name == BASE_ROW or name not in layer.r:
            continue
        group = _factor_tensors(layer, name)
        if _stackable(layer, name, group, grad):
            names.append(name)
            tensors.append(group)
    if not names:
        return None
    scalings = [float(layer.scaling[n]) for n in names]
    if cached is None or not cached.fresh(tuple(names), tensors, scalings):
        cached = layer.row_stack.stack = _build(tuple(names), tensors, scalings)
    cached.checked_in, cached.checked_mode = block, mode
    return cached


@torch.inference_mode(
    False
)  # normal tensors even when built under inference_mode, so later grad-mode uses work
@torch.no_grad()
def _build(names: tuple[str, ...], tensors: list[tuple[Tensor, ...]], scalings: list[float]) -> _Stack:
    flat = [t for group in tensors for t in group]
    dtype = flat[0].dtype
    for t in flat[1:]:
        # Adapters loaded in different dtypes share one stack in the widest of them.
        dtype = torch.promote_types(dtype, t.dtype)
    device = flat[0].device
    rank = max(group[0].shape[0] for group in tensors)
    # Linear: A (r, in), B (out, r). Embedding (PEFT's raw parameters): A (r, num_embeddings), B (dim, r).
    # Both give down = Aᵀ (rows, r) and up = Bᵀ (r, out): the formulas agree.
    rows_dim, out_dim = tensors[0][0].shape[1], tensors[0][1].shape[0]
    down = torch.zeros(len(names) + 1, rows_dim, rank, dtype=dtype, device=device)
    up = torch.zeros(len(names) + 1, rank, out_dim, dtype=dtype, device=device)
    with_bias = any(len(group) == 3 for group in tensors)
    bias = torch.zeros(len(names) + 1, out_dim, dtype=dtype, device=device) if with_bias else None
    for slot, (group, scaling) in enumerate(zip(tensors, scalings), start=1):
        a, b = group[0], group[1]
        r = a.shape[0]
        down[slot, :, :r] = a.detach().T
        up[slot, :r, :] = scaling * b.detach().T.to(dtype)
        if len(group) == 3:
            bias[slot] = scaling * group[2].detach().to(dtype)
    return _Stack(
        names=names,
        sources=tuple(weakref.ref(t) for t in flat),
        versions=_versions(flat, scalings, tensors),
        down=down,
        up=up,
        bias=bias,
        slots={n: i for i, n in enumerate(names, start=1)},
    )


def add_linear_rows(
    layer: LoraLayer, x: Tensor, result: Tensor, rows: Sequence[str]
) -> tuple[Tensor, tuple[str, ...]]:
    """(result with the batched LoRA term of every stackable row added, the rows still to do per adapter).

    x: the layer input (batch, ..., in); result: the base layer's output (batch, ..., out). The sum is
    formed in the adapters' dtype and rounded once to the base dtype, as in the single-adapter path.
    """
    stack = _stack(layer, rows)
    if stack is None:
        return result, tuple(rows)
    slot, mask, left_over = stack.row_slots(tuple(rows), x.device)
    down, up = stack.side_by_side()
    flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(down.dtype)
    # D and U play A and B of one adapter of rank K·R; the mask keeps each row to its own slot's columns.
    out = lora_update(result.reshape(flat.shape[0], flat.shape[1], -1), flat, down.t(), up.t(), 1.0,
                      mask=mask.unsqueeze(1))
    if stack.bias is not None:
        out = out + stack.bias.index_select(0, slot).unsqueeze(1)
    return out.view(result.shape).to(result.dtype), left_over


def add_embedding_rows(
    layer: LoraLayer, ids: Tensor, result: Tensor, rows: Sequence[str]
) -> tuple[Tensor, tuple[str, ...]]:
    """As `add_linear_rows`, for an embedding layer: token ids (batch, ...) → embeddings (batch, ..., dim)."""
    base = layer.base_layer
    # max_norm renormalises the looked-up rows in place; leave that rare case to the per-adapter path.
    stack = _stack(layer, rows) if base.max_norm is None else None
    if stack is None:
        return result, tuple(rows)
    slot, _, left_over = stack.row_slots(tuple(rows), ids.device)
    flat = ids.reshape(ids.shape[0], -1)
    gathered = stack.down[slot.unsqueeze(1), flat]  # (batch, tokens, R): row i's Aᵀ at its own tokens
    out = torch.bmm(gathered, stack.up.index_select(0, slot)).reshape(result.shape)
    embed_scale = getattr(base, "embed_scale", None)
    if embed_scale is not None:
        # e.g. Gemma multiplies embeddings by √dim inside the layer; the update must follow.
        out = out * embed_scale.to(out.dtype)
    return (result + out).to(result.dtype), left_over
