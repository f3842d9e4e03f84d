"""Portable saving of adapters whose init moved the base weight (OLoRA, PiSSA; issue 4).

`save_pretrained` writes, by default, A' = [A; A₀], B' = [B, −B₀] with r and lora_alpha doubled (×√2 under
rsLoRA), so that the adapter applies to the untouched base: PEFT 0.21.2 (the oracle), lorakit's own loader
and its merge must all reproduce the trained model. `portable=False` keeps the raw form, which reloads by
re-running the init on a fresh base.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import (
    clone_model,
    file_tensors,
    input_ids,
    lk_config,
    logits,
    make_model,
    max_diff,
    perturb_adapter,
    quiet,
    seeded,
)

import lorakit
from lorakit.layers import LoraLayer

TOL = 1e-4
PREFIX = "base_model.model."


def train(kind: str, dtype: torch.dtype = torch.float32, hidden: int = 32, seed: int = 0, **kwargs):
    """(untouched base, adapted model after a fake training step): init under a fixed seed, then every
    trainable tensor offset by noise, as training would."""
    base = make_model(kind, dtype=dtype, hidden=hidden)
    with quiet(), seeded(seed):
        model = lorakit.get_peft_model(clone_model(base), lk_config(**kwargs))
    perturb_adapter(model, scale=0.05)
    return base, model


def load_peft(base, directory):
    import peft

    with quiet():
        return peft.PeftModel.from_pretrained(clone_model(base), str(directory))


def load_lorakit(base, directory, **kwargs):
    with quiet():
        return lorakit.PeftModel.from_pretrained(clone_model(base), str(directory), **kwargs)


def saved_config(directory: Path) -> dict:
    return json.loads((Path(directory) / "adapter_config.json").read_text())


def lora_layers(model) -> list[tuple[str, LoraLayer]]:
    return [(n.removeprefix(PREFIX), m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


LLAMA = ["q_proj", "v_proj", "down_proj"]
CASES = {
    "olora": ("llama", dict(init_lora_weights="olora")),
    "pissa": ("llama", dict(init_lora_weights="pissa")),
    "pissa_niter_4": ("llama", dict(init_lora_weights="pissa_niter_4")),
    "olora-rslora": ("llama", dict(init_lora_weights="olora", use_rslora=True)),
    "pissa-rslora": ("llama", dict(init_lora_weights="pissa", use_rslora=True)),
    "patterns": (
        "llama",
        dict(init_lora_weights="pissa", rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}),
    ),
    # PEFT's own conversion refuses rsLoRA with patterns; scaling alpha_pattern by √2 as well keeps it exact.
    "patterns-rslora": (
        "llama",
        dict(
            init_lora_weights="olora",
            use_rslora=True,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"q_proj": 3, "down_proj": 5},
        ),
    ),
    "gpt2-olora": (
        "gpt2",
        dict(init_lora_weights="olora", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
    "gpt2-pissa": (
        "gpt2",
        dict(init_lora_weights="pissa", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    ),
    "gpt2-lora_bias": (
        "gpt2",
        dict(
            init_lora_weights="pissa_niter_2", target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True
        ),
    ),
    "embedding": (
        "llama",
        dict(init_lora_weights="olora", target_modules=["q_proj", "v_proj", "embed_tokens"]),
    ),
    "dora-olora": ("llama", dict(init_lora_weights="olora", use_dora=True)),
    "dora-pissa-embedding": (
        "llama",
        dict(init_lora_weights="pissa", use_dora=True, target_modules=["q_proj", "embed_tokens"]),
    ),
    "dora-gpt2": (
        "gpt2",
        dict(init_lora_weights="olora", use_dora=True, target_modules=["c_attn"], fan_in_fan_out=True),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_portable_adapter_reproduces_training_on_the_untouched_base(case, tmp_path):
    kind, extra = CASES[case]
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": LLAMA, **extra}
    base, model = train(kind, **kwargs)
    trained = logits(model)
    assert max_diff(trained, logits(base)) > 1e-2  # the fake training did change the model
    model.save_pretrained(tmp_path)

    config = saved_config(tmp_path)
    factor = math.sqrt(2) if kwargs.get("use_rslora") else 2
    assert config["init_lora_weights"] is True
    assert config["r"] == 8 and config["lora_alpha"] == pytest.approx(factor * 8)
    assert config["rank_pattern"] == {k: 2 * v for k, v in kwargs.get("rank_pattern", {}).items()}
    assert config["alpha_pattern"] == pytest.approx(
        {k: factor * v for k, v in kwargs.get("alpha_pattern", {}).items()}
    )
    # Saving leaves the in-memory adapter as it was.
    assert (
        model.peft_config["default"].r == 4
        and model.peft_config["default"].init_lora_weights == kwargs["init_lora_weights"]
    )
    assert max_diff(logits(model), trained) == 0

    assert max_diff(logits(load_peft(base, tmp_path)), trained) < TOL
    ours = load_lorakit(base, tmp_path)
    assert max_diff(logits(ours), trained) < TOL
    assert max_diff(logits(ours.merge_and_unload()), trained) < TOL


def test_saved_factors_are_the_trained_and_initial_blocks(tmp_path):
    base, model = train("llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                        init_lora_weights="pissa")
    model.save_pretrained(tmp_path)
    saved = file_tensors(tmp_path)
    layers = lora_layers(model)
    assert len(layers) == 5
    for name, layer in layers:
        a, b = layer.factors("default")
        embedding = name.endswith("embed_tokens")
        keys = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        a_key, b_key = (f"{PREFIX}{name}.{key}" for key in keys)
        assert saved[a_key].shape == (8, a.shape[1]) and saved[b_key].shape == (b.shape[0], 8)
        assert torch.equal(saved[a_key][:4], a.detach()) and torch.equal(saved[b_key][:, :4], b.detach())
        if embedding:
            # Embeddings keep their base (PEFT's zero-A/normal-B init): zero blocks pad them to rank 2r.
            assert "default" not in layer.initial_factors
            assert not saved[a_key][4:].any() and not saved[b_key][:, 4:].any()
            assert torch.equal(saved[f"{PREFIX}{name}.base_layer.weight"], base.get_submodule(name).weight)
        else:
            a0, b0 = layer.initial_factors["default"]
            assert torch.equal(saved[a_key][4:], a0) and torch.equal(saved[b_key][:, 4:], -b0)


def test_dora_magnitude_is_saved_unchanged(tmp_path):
    _, model = train(
        "llama", r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="olora", use_dora=True
    )
    model.save_pretrained(tmp_path)
    saved = file_tensors(tmp_path)
    for name, layer in lora_layers(model):
        assert torch.equal(
            saved[f"{PREFIX}{name}.lora_magnitude_vector"], layer.lora_magnitude_vector["default"].weight
        )


def test_adapters_that_leave_the_base_alone_are_saved_as_they_are(tmp_path):
    base, model = train("llama", r=4, lora_alpha=8, target_modules=LLAMA, init_lora_weights="pissa")
    with seeded(1):
        model.add_adapter(
            "plain", lk_config(r=4, lora_alpha=8, target_modules=LLAMA, init_lora_weights="gaussian")
        )
    model.save_pretrained(tmp_path)
    assert saved_config(tmp_path)["r"] == 8
    plain = saved_config(tmp_path / "plain")
    assert plain["r"] == 4 and plain["lora_alpha"] == 8 and plain["init_lora_weights"] == "gaussian"
    saved = file_tensors(tmp_path / "plain")
    for name, layer in lora_layers(model):
        a, b = layer.factors("plain")
        assert torch.equal(saved[f"{PREFIX}{name}.lora_A.weight"], a.detach())
        assert torch.equal(saved[f"{PREFIX}{name}.lora_B.weight"], b.detach())


# ---- raw form (portable=False): resuming training ----------------------------------------------------


@pytest.mark.parametrize("method", ["olora", "pissa", "pissa_niter_4", "dora-olora"])
def test_raw_adapter_reloads_by_rerunning_the_init(method, tmp_path):
    use_dora = method.startswith("dora-")
    init = method.removeprefix("dora-")
    kwargs = dict(r=4, lora_alpha=8, target_modules=LLAMA, init_lora_weights=init, use_dora=use_dora)
    base, model = train("llama", seed=5, **kwargs)
    trained = logits(model)
    model.save_pretrained(tmp_path / "raw", portable=False)
    model.save_pretrained(tmp_path / "portable")
    config = saved_config(tmp_path / "raw")
    assert config["init_lora_weights"] == init and config["r"] == 4 and config["lora_alpha"] == 8
    assert {k for k in file_tensors(tmp_path / "raw") if "lora_A" in k} == {
        k for k in file_tensors(tmp_path / "portable") if "lora_A" in k}

    # Loading re-runs the (deterministic; for pissa_niter_N, identically seeded) init on the fresh base,
    # then loads A and B: the trained model comes back, in lorakit and in PEFT.
    with seeded(5):
        resumed = load_lorakit(base, tmp_path / "raw", is_trainable=True)
    assert max_diff(logits(resumed), trained) < TOL
    with seeded(5):
        assert max_diff(logits(load_peft(base, tmp_path / "raw")), trained) < TOL

    # The resumed model knows A₀, B₀ again, so it exports the same portable adapter.
    resumed.save_pretrained(tmp_path / "again")
    direct, again = file_tensors(tmp_path / "portable"), file_tensors(tmp_path / "again")
    assert direct.keys() == again.keys()
    assert max(max_diff(direct[k], again[k]) for k in direct) < 1e-6
    assert saved_config(tmp_path / "again") == saved_config(tmp_path / "portable")
    # Merging the raw-loaded model (residual base + s·BA) also gives the trained model.
    assert max_diff(logits(resumed.merge_and_unload()), trained) < TOL


# ---- half precision -------------------------------------------------------------------------------


def peft_converted(base, kwargs: dict, directory: Path):
    """PEFT's documented path: save the adapter before training, train, then save with
    `path_initial_model_for_weight_conversion` (same seed and the same fake training as `train`)."""
    import peft

    with quiet(), seeded(0):
        model = peft.get_peft_model(clone_model(base), peft.LoraConfig(**kwargs))
    initial = directory / "initial"
    with quiet():
        model.save_pretrained(initial)
    perturb_adapter(model, scale=0.05)
    with quiet():
        model.save_pretrained(directory / "converted", path_initial_model_for_weight_conversion=str(initial))
    return model, directory / "converted"


def merge_error(base, merged, directory: Path) -> torch.Tensor:
    """|merged weight − (W + s·B'A') computed in float32| over every adapted layer of a merged model, for the
    untouched base W and the adapter saved in `directory` (in file order)."""
    config, saved = saved_config(directory), file_tensors(directory)
    errors = []
    for key, a in saved.items():
        if key.endswith("lora_A.weight"):
            name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = saved[key.replace("lora_A", "lora_B")]
            exact = base.get_submodule(name).weight.float() + config["lora_alpha"] / config["r"] * (b @ a)
            errors.append((merged.get_submodule(name).weight.float() - exact).abs().flatten())
    return torch.cat(errors)


@pytest.mark.parametrize(
    ("method", "dtype"), [("olora", torch.float16), ("pissa", torch.float16), ("olora", torch.bfloat16)]
)
def test_half_precision_merge_is_no_worse_than_peft(method, dtype, tmp_path):
    kwargs = dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        init_lora_weights=method,
    )
    base, model = train("llama", dtype=dtype, hidden=64, **kwargs)
    logit_tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # a few ulps of the half-precision logits
    ids = input_ids(batch=4, length=16)
    trained = logits(model, ids)
    model.save_pretrained(tmp_path / "lorakit")
    _, peft_dir = peft_converted(base, kwargs, tmp_path / "peft")

    gaps, errors = {}, {}
    for source, directory in (("lorakit", tmp_path / "lorakit"), ("peft", peft_dir)):
        for lib, load in (("lorakit", load_lorakit), ("peft", load_peft)):
            adapted = load(base, directory)
            unmerged = logits(adapted, ids)
            # Both files hold the trained model (PEFT's A₀, B₀ went through the base dtype at init).
            assert (unmerged - trained).abs().max() < logit_tol
            merged = adapted.merge_and_unload()
            gaps[source, lib] = (logits(merged, ids) - unmerged).abs()
            errors[source, lib] = merge_error(base, merged, directory)
    # Same file: lorakit merges in float32 and rounds once, to the nearest half-precision weight; PEFT adds a
    # ΔW already rounded to the base dtype (two roundings). So lorakit's error is never larger, element-wise.
    for source in ("lorakit", "peft"):
        assert (errors[source, "lorakit"] <= errors[source, "peft"] + 1e-6).all()
    # Each library's own path (lorakit: portable save; PEFT: path_initial_model_for_weight_conversion):
    # the merged-vs-unmerged logit gap is rounding noise of the same size.
    ours, theirs = gaps["lorakit", "lorakit"], gaps["peft", "peft"]
    assert ours.mean() <= 1.1 * theirs.mean() and ours.max() < logit_tol


def test_a_second_base_moving_adapter_is_refused_early(tmp_path):
    base, model = train("llama", r=4, lora_alpha=8, target_modules=LLAMA, init_lora_weights="olora")
    trained = logits(model)
    model.save_pretrained(tmp_path, portable=False)
    with pytest.raises(ValueError, match="already replaced the base weight"):
        model.add_adapter(
            "second", lk_config(r=4, lora_alpha=8, target_modules=LLAMA, init_lora_weights="pissa")
        )
    with pytest.raises(lorakit.AdapterFileError, match="already replaced the base weight"):
        model.load_adapter(tmp_path, "raw_again")
    # Nothing was half-added; an adapter that leaves the base alone is still welcome.
    assert list(model.peft_config) == ["default"] and max_diff(logits(model), trained) == 0
    model.add_adapter("plain", lk_config(r=4, lora_alpha=8, target_modules=LLAMA))
    assert list(model.peft_config) == ["default", "plain"]
