"""Mixed-adapter batches in one batched matmul: every row's LoRA term at once, whatever its adapter.

A batch whose rows use different adapters (`adapter_names=[...]`, see `base.row_adapters`) could run one
small matmul pair per distinct adapter on that adapter's rows (gather, compute, scatter back). With many
adapters per batch — a server mixing requests for 16 adapters — that is 16 tiny matmuls and 16 scatters
per layer per decoding step. Here the factors of the adapters in the batch are stacked once per layer:

    down[k] = A_kᵀ zero-padded to the largest rank R,   up[k] = s_k · B_kᵀ zero-padded,   slot 0 = zeros,

and row i uses slot k(i) (0 for "__base__" rows and for adapters this layer does not carry), so the
whole LoRA term is `bmm(bmm(x, down[slot]), up[slot])`: two batched matmuls for any mix of adapters and
ranks. The zero padding adds exact zeros, so each row equals its per-adapter result up to float rounding.

Stacking costs a copy of every factor, so it is cached per layer, keyed by the adapter set of the batch
and by a version of each factor: the tensor itself (held by weak reference, so a deleted adapter reloaded
under the same name never matches), its storage pointer and torch's in-place version counter (bumped by
optimizer steps, `copy_` while loading, `merge`-style writes). Prefill and every decoding step of a
generation hit the same entry. Writes through `param.data` bypass torch's version counter; code that edits
factors that way and then runs a mixed batch must call `clear_stacks()` first.

Rows this path does not take are left to the caller's per-adapter path: DoRA adapters (their magnitude
rescaling depends on the whole adapted weight, not on a per-row low-rank term) and, while training,
adapters with active dropout or factors that need gradients (the stacks are detached copies).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lorakit.layers.base import BASE_ROW, LoraLayer


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

    def fresh(self, names: tuple[str, ...], tensors: Sequence[tuple[Tensor, ...]], scalings: Sequence[float]) -> bool:
        if names != self.names:
            return False
        flat = [t for group in tensors for t in group]
        return (all(ref() is t for ref, t in zip(self.sources, flat))
                and _versions(flat, scalings, tensors) == self.versions)


_STACKS: weakref.WeakKeyDictionary[LoraLayer, _Stack] = weakref.WeakKeyDictionary()


def clear_stacks() -> None:
    """Forget every cached stack (needed only after editing adapter factors through `param.data`)."""
    _STACKS.clear()


def _versions(flat: Sequence[Tensor], scalings: Sequence[float], groups: Sequence[tuple[Tensor, ...]]) -> tuple:
    # One scaling per adapter, repeated for each of its tensors so the tuple lines up with `flat`.
    per_tensor = [s for s, group in zip(scalings, groups) for _ in group]
    return tuple((t._version, t.data_ptr(), s) for t, s in zip(flat, per_tensor))


def _factor_tensors(layer: LoraLayer, name: str) -> tuple[Tensor, ...]:
    """A, B (as stored by PEFT) and, with lora_bias, B's bias."""
    a, b = layer.factors(name)
    bias = layer.lora_B[name].bias if layer.lora_bias.get(name) else None
    return (a, b) if bias is None else (a, b, bias)


def _stackable(layer: LoraLayer, name: str) -> bool:
    if name not in layer.r or name in layer.lora_magnitude_vector:
        return False
    if layer.training and not isinstance(layer.lora_dropout[name], nn.Identity):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in _factor_tensors(layer, name)))


def _stack(layer: LoraLayer, rows: Sequence[str]) -> _Stack | None:
    """The cached stack for the stackable adapters among `rows`, rebuilt if any of them changed."""
    # Sorted: the same adapter set in another row order reuses the stack.
    names = tuple(sorted(n for n in set(rows) if n != BASE_ROW and _stackable(layer, n)))
    if not names:
        return None
    tensors = [_factor_tensors(layer, n) for n in names]
    scalings = [float(layer.scaling[n]) for n in names]
    cached = _STACKS.get(layer)
    if cached is not None and cached.fresh(names, tensors, scalings):
        return cached
    stack = _build(names, tensors, scalings)
    _STACKS[layer] = stack
    return stack


@torch.inference_mode(False)  # normal tensors even when built under inference_mode, so later grad-mode uses work
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
    return _Stack(names=names, sources=tuple(weakref.ref(t) for t in flat), versions=_versions(flat, scalings, tensors),
                  down=down, up=up, bias=bias, slots={n: i for i, n in enumerate(names, start=1)})


def _slots(stack: _Stack, rows: Sequence[str], device: torch.device) -> Tensor:
    return torch.tensor([stack.slots.get(n, 0) for n in rows], device=device)


def _left_over(stack: _Stack, rows: Sequence[str]) -> tuple[str, ...]:
    """`rows` with the rows handled here turned into base rows, for the caller's per-adapter path."""
    return tuple(BASE_ROW if n in stack.slots else n for n in rows)


def add_linear_rows(layer: LoraLayer, x: Tensor, result: Tensor, rows: Sequence[str]) -> tuple[Tensor, tuple[str, ...]]:
    """(result with the batched LoRA term of every stackable row added, the rows still to do per adapter).

    x: the layer input (batch, ..., in); result: the base layer's output (batch, ..., out). The sum is
    formed in the adapters' dtype and rounded once to the base dtype, as in the single-adapter path.
    """
    stack = _stack(layer, rows)
    if stack is None:
        return result, tuple(rows)
    slot = _slots(stack, rows, x.device)
    flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(stack.down.dtype)
    out = torch.bmm(torch.bmm(flat, stack.down.index_select(0, slot)), stack.up.index_select(0, slot))
    if stack.bias is not None:
        out = out + stack.bias.index_select(0, slot).unsqueeze(1)
    return (result + out.reshape(result.shape)).to(result.dtype), _left_over(stack, rows)


def add_embedding_rows(layer: LoraLayer, ids: Tensor, result: Tensor, rows: Sequence[str]) -> tuple[Tensor, tuple[str, ...]]:
    """As `add_linear_rows`, for an embedding layer: token ids (batch, ...) → embeddings (batch, ..., dim)."""
    base = layer.base_layer
    # max_norm renormalises the looked-up rows in place; leave that rare case to the per-adapter path.
    stack = _stack(layer, rows) if base.max_norm is None else None
    if stack is None:
        return result, tuple(rows)
    slot = _slots(stack, rows, ids.device)
    flat = ids.reshape(ids.shape[0], -1)
    gathered = stack.down[slot.unsqueeze(1), flat]  # (batch, tokens, R): row i's Aᵀ at its own tokens
    out = torch.bmm(gathered, stack.up.index_select(0, slot)).reshape(result.shape)
    embed_scale = getattr(base, "embed_scale", None)
    if embed_scale is not None:
        # e.g. Gemma multiplies embeddings by √dim inside the layer; the update must follow.
        out = out * embed_scale.to(out.dtype)
    return (result + out).to(result.dtype), _left_over(stack, rows)
