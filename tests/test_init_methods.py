"""OLoRA, PiSSA and Gaussian initialisation (issue 4): each initialiser on its own, then inside a model
against PEFT 0.21.2 as the oracle (same base weights, same seed → same factors and residual base weights).

Contract of an initialiser `(W (out, in) fp32, r, s) → (A, B, residual)`: residual + s·B·A = W, so outputs
are unchanged at step 0; the maths runs in float32 and the residual is rounded into the base dtype once.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    clone_model,
    input_ids,
    lk_config,
    logits,
    make_model,
    max_diff,
    peft_config,
    quiet,
    seeded,
)

import lorakit
from lorakit.init import initialiser, moves_base_weight
from lorakit.init.default import init_gaussian
from lorakit.init.olora import init_olora
from lorakit.init.pissa import init_pissa
from lorakit.layers import LoraLayer

TOL = 1e-4
SHAPES = [(48, 32), (32, 48), (32, 32)]


def random_weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) / shape[1] ** 0.5


def spectrum_weight(
    out_features: int, in_features: int, singular_values: torch.Tensor, seed: int = 0
) -> torch.Tensor:
    """U diag(S) Vᵀ with random orthonormal U, V and the given singular values."""
    gen = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(out_features, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(in_features, k, generator=gen))
    return u @ torch.diag(singular_values) @ v.T


# ---- the initialisers on their own ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scaling", [2.0, 0.5])
def test_olora_factors_are_the_leading_qr_blocks(shape, scaling):
    weight, r = random_weight(shape), 5
    init = init_olora(weight, r, scaling)
    q, rr = torch.linalg.qr(weight)
    assert init.lora_A.shape == (r, shape[1]) and init.lora_B.shape == (shape[0], r)
    assert max_diff(init.lora_A, rr[:r]) < 1e-6 and max_diff(init.lora_B, q[:, :r]) < 1e-6
    # B = Q_r has orthonormal columns; A = R_r is upper trapezoidal.
    assert max_diff(init.lora_B.T @ init.lora_B, torch.eye(r)) < 1e-5
    assert torch.equal(init.lora_A, torch.triu(init.lora_A))
    assert max_diff(init.residual + scaling * init.lora_B @ init.lora_A, weight) < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scaling", [2.0, 0.5])
def test_pissa_factors_carry_the_top_singular_directions(shape, scaling):
    weight, r = random_weight(shape, seed=1), 6
    init = init_pissa(weight, r, scaling)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    assert init.lora_A.shape == (r, shape[1]) and init.lora_B.shape == (shape[0], r)
    # s·B·A is the best rank-r approximation of W, and the residual holds the remaining spectrum.
    top = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    assert max_diff(scaling * init.lora_B @ init.lora_A, top) < 1e-5
    assert max_diff(torch.linalg.svdvals(init.residual)[: min(shape) - r], s[r:]) < 1e-5
    assert max_diff(init.residual + scaling * init.lora_B @ init.lora_A, weight) < 1e-6
    # Each factor is a singular basis scaled by √(S_r/s): B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ.
    root = torch.sqrt(s[:r] / scaling)
    assert max_diff(init.lora_B, u[:, :r] * root) < 1e-5
    assert max_diff(init.lora_A, root[:, None] * vh[:r]) < 1e-5
    assert max_diff(init.lora_B.T @ init.lora_B, torch.diag(s[:r] / scaling)) < 1e-5
    assert max_diff(init.lora_A @ init.lora_A.T, torch.diag(s[:r] / scaling)) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_pissa_niter_finds_the_top_subspace_and_is_seeded_by_torch(shape):
    # A clear gap after the 4th singular value: a few subspace iterations recover the top-4 part.
    singular = torch.tensor([8.0, 6.0, 5.0, 4.0] + [0.1] * (min(shape) - 4))
    weight, r, scaling = spectrum_weight(*shape, singular), 4, 2.0
    with seeded(3):
        init = init_pissa(weight, r, scaling, niter=4)
    with seeded(3):
        again = init_pissa(weight, r, scaling, niter=4)
    assert torch.equal(init.lora_A, again.lora_A) and torch.equal(init.lora_B, again.lora_B)
    exact = init_pissa(weight, r, scaling)
    assert max_diff(scaling * init.lora_B @ init.lora_A, scaling * exact.lora_B @ exact.lora_A) < 1e-4
    assert max_diff(init.residual + scaling * init.lora_B @ init.lora_A, weight) < 1e-5


def test_initialisers_take_the_weight_in_float32():
    weight = random_weight((32, 24)).half()
    for init in (init_olora(weight, 4, 2.0), init_pissa(weight, 4, 2.0)):
        assert {init.lora_A.dtype, init.lora_B.dtype, init.residual.dtype} == {torch.float32}
        assert max_diff(init.residual + 2.0 * init.lora_B @ init.lora_A, weight.float()) < 1e-6


def test_gaussian_init_leaves_the_base_alone():
    with seeded(0):
        init = init_gaussian(random_weight((64, 48)), 8, 2.0)
    assert init.residual is None and torch.equal(init.lora_B, torch.zeros(64, 8))
    assert init.lora_A.shape == (8, 48) and abs(init.lora_A.std().item() - 1 / 8) < 0.01


def test_rank_beyond_the_weight_or_nonpositive_scaling_is_refused():
    weight = random_weight((16, 8))
    for method in ("olora", "pissa", "pissa_niter_2"):
        with pytest.raises(ValueError, match=r"r=9 exceeds min\(out, in\)"):
            initialiser(method)(weight, 9, 1.0)
    with pytest.raises(ValueError, match="positive scaling"):
        init_pissa(weight, 4, -1.0)


def test_method_names():
    assert initialiser("olora") is init_olora and initialiser("pissa") is init_pissa
    assert initialiser("pissa_niter_7").keywords == {"niter": 7}
    assert initialiser("gaussian") is init_gaussian
    assert [moves_base_weight(m) for m in ("olora", "pissa", "pissa_niter_2", "gaussian", True, False)] == [
        True, True, True, False, False, False]
    with pytest.raises(ValueError, match="unknown method"):
        initialiser("pissa_niter_")


# ---- inside a model, against PEFT ----------------------------------------------------------------------


def both_libraries(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs):
    """The same tiny base model adapted by lorakit and by PEFT, torch seeded identically before each init."""
    import peft

    base = make_model(kind, dtype=dtype)
    with quiet(), seeded(seed):
        ours = lorakit.get_peft_model(clone_model(base), lk_config(**kwargs))
    with quiet(), seeded(seed):
        theirs = peft.get_peft_model(clone_model(base), peft_config(**kwargs))
    return base, ours, theirs


def assert_same_parameters(ours, theirs, tol: float = TOL) -> None:
    """Every adapter factor and every (moved) base weight equal, under PEFT's in-memory names."""
    mine, peft_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    compared = [k for k in peft_params if "lora_" in k or k.endswith("base_layer.weight")]
    assert compared and set(compared) <= set(mine)
    for key in compared:
        assert mine[key].shape == peft_params[key].shape, key
        assert max_diff(mine[key], peft_params[key]) < tol, key


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("method", ["olora", "pissa", "pissa_niter_4", "gaussian", True])
def test_llama_factors_and_residuals_equal_peft(method):
    base, ours, theirs = both_libraries(
        "llama", r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=method
    )
    assert_same_parameters(ours, theirs)
    # Step 0: the adapted model is the base model.
    assert max_diff(logits(ours), logits(base)) < TOL


@pytest.mark.parametrize("method", ["pissa", "pissa_niter_4"])
def test_gpt2_conv1d_pissa_equals_peft(method):
    base, ours, theirs = both_libraries(
        "gpt2", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
        init_lora_weights=method)
    assert_same_parameters(ours, theirs)
    assert max_diff(logits(ours), logits(base)) < TOL


def test_gpt2_conv1d_olora_decomposes_the_out_in_weight():
    # No oracle here: PEFT 0.21.2's olora_init ignores fan_in_fan_out (it factors the stored (in, out)
    # weight and gives factors of the wrong shape for non-square Conv1D). lorakit factors Wᵀ = (out, in).
    base = make_model("gpt2")
    with quiet():
        model = lorakit.get_peft_model(
            clone_model(base),
            lk_config(
                r=4,
                lora_alpha=8,
                target_modules=["c_attn", "c_fc"],
                fan_in_fan_out=True,
                init_lora_weights="olora",
            ),
        )
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 4
    for name, layer in layers:
        original = base.get_submodule(name.removeprefix("base_model.model.")).weight  # (in, out)
        expected = init_olora(original.T, 4, 2.0)
        a, b = layer.factors("default")
        assert max_diff(a, expected.lora_A) < 1e-6 and max_diff(b, expected.lora_B) < 1e-6
        assert max_diff(layer.base_layer.weight, expected.residual.T) < 1e-6
    assert max_diff(logits(model), logits(base)) < TOL


def test_rank_and_alpha_patterns_use_each_modules_own_scaling():
    kwargs = dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights="olora",
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3},
    )
    base, ours, theirs = both_libraries("llama", **kwargs)
    assert_same_parameters(ours, theirs)
    layer = ours.base_model.model.model.layers[0].self_attn.v_proj
    assert layer.factors("default")[0].shape == (2, 32) and layer.scaling["default"] == 4.0
    assert ours.base_model.model.model.layers[1].mlp.down_proj.scaling["default"] == 0.75
    assert max_diff(logits(ours), logits(base)) < TOL


@pytest.mark.parametrize("method", ["olora", "pissa"])
def test_dora_on_top_starts_from_the_base_model(method):
    base, ours, theirs = both_libraries(
        "llama",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=method,
        use_dora=True,
    )
    assert_same_parameters(ours, theirs)  # includes lora_magnitude_vector: ‖W_res + s·B₀A₀‖ = ‖W‖
    assert max_diff(logits(ours), logits(base)) < TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["olora", "pissa"])
def test_half_precision_base_is_rounded_once(dtype, method):
    base, ours, theirs = both_libraries("llama", dtype=dtype, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                        init_lora_weights=method)
    layers = [(n, m) for n, m in ours.named_modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 12
    for name, layer in layers:
        original = base.get_submodule(name.removeprefix("base_model.model.")).weight
        expected = initialiser(method)(original.float(), 4, 2.0)
        a, b = layer.factors("default")
        # Factors stay float32 (autocast_adapter_dtype); the residual is the fp32 residual rounded once.
        assert (
            a.dtype == torch.float32
            and max_diff(a, expected.lora_A) < 1e-6
            and max_diff(b, expected.lora_B) < 1e-6
        )
        assert layer.base_layer.weight.dtype == dtype
        assert torch.equal(layer.base_layer.weight, expected.residual.to(dtype))
    # PEFT stores the same residual. Its factors, though, make a round trip through the base dtype (PEFT
    # moves the new adapter to the base layer's dtype before upcasting it to float32), so they equal ours
    # rounded to that dtype — while its residual was computed from the unrounded ones.
    mine, peft_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for key, value in peft_params.items():
        if key.endswith("base_layer.weight"):
            assert torch.equal(mine[key], value), key
        elif "lora_" in key:
            assert value.dtype == torch.float32 and torch.equal(mine[key].to(dtype).float(), value), key
    # Step 0 differs from the base only by that one rounding of the residual (and the half-precision
    # matmuls); the mean gap over many logits is a stable measure, the max is a few ulps either way.
    ids = input_ids(batch=4, length=16)
    ref = logits(base, ids)
    gap_ours, gap_peft = ((logits(m, ids) - ref).abs() for m in (ours, theirs))
    assert gap_ours.mean() <= 1.1 * gap_peft.mean()
    assert gap_ours.max() < (1e-2 if dtype == torch.bfloat16 else 1e-3)
