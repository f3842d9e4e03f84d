"""The merge maths as pure tensor functions (`lorakit.merge.delta`, `lorakit.merge.combine`), checked against
values computed by hand, and the same numbers once through a live model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.merge import combine
from lorakit.merge.delta import add_delta, dora_merge, dora_norm, dora_unmerge, lora_delta

T = torch.tensor

# A (r=1, in=2), B (out=2, r=1), s = 0.5:  s · B @ A = 0.5 · [[3, 6], [4, 8]].
A, B, S = T([[1.0, 2.0]]), T([[3.0], [4.0]]), 0.5


def test_linear_delta_is_scaled_b_times_a_in_out_by_in_layout() -> None:
    assert torch.equal(lora_delta(A, B, S), T([[1.5, 3.0], [2.0, 4.0]]))


def test_conv1d_delta_is_transposed_to_in_by_out() -> None:
    assert torch.equal(lora_delta(A, B, S, transpose=True), T([[1.5, 2.0], [3.0, 4.0]]))


def test_embedding_delta_from_peft_layout() -> None:
    # PEFT's embedding factors: A (r, num_embeddings) = (1, 3), B (dim, r) = (2, 1); the weight is (3, 2).
    a, b = T([[1.0, 0.0, 2.0]]), T([[1.0], [-1.0]])
    assert torch.equal(lora_delta(a, b, 2.0, transpose=True), T([[2.0, -2.0], [0.0, 0.0], [4.0, -4.0]]))


def test_delta_is_float32_from_half_factors() -> None:
    delta = lora_delta(A.bfloat16(), B.bfloat16(), S)
    assert delta.dtype == torch.float32 and torch.equal(delta, T([[1.5, 3.0], [2.0, 4.0]]))


def test_add_delta_rounds_once_not_into_the_stored_dtype() -> None:
    # 1 + 2⁻¹⁰ is not a bfloat16 (8 bits of mantissa), so a bf16 sum would give 1.0.
    summed = add_delta(T([1.0]).bfloat16(), T([2.0 ** -10]))
    assert summed.dtype == torch.float32 and summed.item() == 1.0 + 2.0 ** -10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_add_delta_equals_the_float32_sum_bit_for_bit(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=generator).to(dtype)
    delta = torch.randn(64, 96, generator=generator) * 1e-3
    assert torch.equal(add_delta(weight, delta.clone()), weight.float() + delta)
    transposed = add_delta(weight, delta.T.clone().T)  # a transposed delta keeps the layout of W + ΔW
    assert torch.equal(transposed, weight.float() + delta) and transposed.stride() == weight.stride()


def test_dora_norm_per_output_feature() -> None:
    weight = T([[3.0, 4.0, 0.0], [0.0, 0.0, 5.0]])
    assert torch.equal(dora_norm(weight, feature_axis=0), T([5.0, 5.0]))  # rows: Linear (out, in)
    assert torch.equal(dora_norm(weight, feature_axis=1), T([3.0, 4.0, 5.0]))  # columns: Conv1D (in, out)


@pytest.mark.parametrize(("feature_axis", "delta", "expected"), [
    # W + ΔW = [[3, 4], [3, 4]]: row norms 5, 5; m = (10, 1) scales row 0 by 2 and row 1 by 0.2.
    (0, T([[0.0, 4.0], [3.0, 0.0]]), T([[6.0, 8.0], [0.6, 0.8]])),
    # W + ΔW = [[3, 3], [4, 4]]: column norms 5, 5; m = (10, 1) scales column 0 by 2 and column 1 by 0.2.
    (1, T([[0.0, 3.0], [4.0, 0.0]]), T([[6.0, 0.6], [8.0, 0.8]])),
])
def test_dora_merge_and_unmerge_round_trip(feature_axis: int, delta: torch.Tensor,
                                           expected: torch.Tensor) -> None:
    weight, magnitude = T([[3.0, 0.0], [0.0, 4.0]]), T([10.0, 1.0])
    merged, norm = dora_merge(weight, delta, magnitude, feature_axis)
    assert torch.allclose(merged, expected) and torch.equal(norm, T([5.0, 5.0]))
    assert torch.allclose(dora_unmerge(merged, delta, magnitude, norm, feature_axis), weight)


def test_dora_round_trip_on_random_tensors() -> None:
    gen = torch.Generator().manual_seed(0)
    weight, delta = torch.randn(6, 5, generator=gen), 0.1 * torch.randn(6, 5, generator=gen)
    for axis, size in ((0, 6), (1, 5)):
        magnitude = torch.rand(size, generator=gen) + 0.5
        merged, norm = dora_merge(weight, delta, magnitude, axis)
        assert torch.allclose(dora_norm(merged, axis), magnitude, atol=1e-6)  # m is the merged norm
        assert torch.allclose(dora_unmerge(merged, delta, magnitude, norm, axis), weight, atol=1e-6)


# Two rank-1 terms (A, B, c = weight · scaling): c₁ = 4 on e₁e₁ᵀ, c₂ = −1 on e₂e₂ᵀ; Σ cᵢ BᵢAᵢ = diag(4, −1).
TERMS = [(T([[1.0, 0.0]]), T([[1.0], [0.0]]), 4.0), (T([[0.0, 1.0]]), T([[0.0], [1.0]]), -1.0)]


def test_linear_combination_sums_square_roots_of_the_coefficients() -> None:
    a, b = combine.linear(TERMS)
    # A = √4·A₁ − √1·A₂, B = √4·B₁ + √1·B₂; B @ A = [[4, −2], [2, −1]] (PEFT's cross terms, not diag(4, −1)).
    assert torch.equal(a, T([[2.0, -1.0]])) and torch.equal(b, T([[2.0], [1.0]]))
    assert torch.equal(b @ a, T([[4.0, -2.0], [2.0, -1.0]]))


def test_cat_combination_stacks_scaled_a_and_pads_to_the_rank() -> None:
    a, b = combine.cat(TERMS, rank=3)
    assert torch.equal(a, T([[4.0, 0.0], [0.0, -1.0], [0.0, 0.0]]))
    assert torch.equal(b, T([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert torch.equal(b @ a, T([[4.0, 0.0], [0.0, -1.0]]))


def test_svd_combination_keeps_the_largest_singular_directions() -> None:
    a, b = combine.svd(TERMS, rank=1)
    assert a.shape == (1, 2) and b.shape == (2, 1)
    assert torch.allclose(b @ a, T([[4.0, 0.0], [0.0, 0.0]]))
    a, b = combine.svd(TERMS, rank=2)
    assert torch.allclose(b @ a, T([[4.0, 0.0], [0.0, -1.0]]))


def test_svd_combination_clamps_at_the_quantile() -> None:
    # Rank 1: B = U·S = [[4], [0]], A = Vᵀ = [[1, 0]]; the median of their entries (0, 0, 1, 4) is 0.5.
    a, b = combine.svd(TERMS, rank=1, clamp=0.5)
    assert torch.equal(b, T([[0.5], [0.0]])) and torch.equal(a, T([[0.5, 0.0]]))


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(T([[1.0, 0.0], [0.0, 1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _set(model, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    layer = model.get_base_model().proj
    with torch.no_grad():
        layer.lora_A[name].weight.copy_(a)
        layer.lora_B[name].weight.copy_(b)


def test_weighted_adapter_and_merge_on_a_live_model() -> None:
    # Two rank-1 adapters with scaling 2 (alpha 2, r 1); weights 0.5 and −1 give c = 1 and −2.
    config = LoraConfig(r=1, lora_alpha=2, target_modules=["proj"])
    model = get_peft_model(OneLinear(), config, adapter_name="x")
    model.add_adapter("y", config)
    _set(model, "x", T([[1.0, 2.0]]), T([[1.0], [0.0]]))
    _set(model, "y", T([[0.0, 1.0]]), T([[1.0], [1.0]]))
    model.add_weighted_adapter(["x", "y"], [0.5, -1.0], "mix", combination_type="cat")
    model.set_adapter("mix")
    # ΔW = 1·[[1, 2], [0, 0]] − 2·[[0, 1], [0, 1]] = [[1, 0], [0, −2]]; W + ΔW = [[2, 0], [0, −1]].
    merged = model.merge_and_unload()
    assert torch.equal(merged.proj.weight, T([[2.0, 0.0], [0.0, -1.0]]))
