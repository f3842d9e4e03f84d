"""PeftModel's API: adapters by name, enable/disable, merge/unmerge/unload, mixed-adapter batches,
loading and saving, the auto class. Numbers are checked, not just that calls return."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import input_ids, logits, make_model, max_diff, perturb_adapter, quiet, seeded
from torch import nn

import lorakit
from lorakit import BASE_ROW, LoraConfig, PeftModel, get_peft_model
from lorakit.inject import lora_layers
from lorakit.layers import LoraLayer, ModulesToSaveWrapper

GPT2 = {"fan_in_fan_out": True}

# Configs covering each layer kind (Linear, Conv1D, Embedding, DoRA, lora_bias, modules_to_save).
CONFIGS = [
    ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"])),
    ("llama", dict(r=4, target_modules=["q_proj", "embed_tokens", "down_proj"], use_dora=True)),
    ("mistral", dict(r=4, target_modules="all-linear", use_rslora=True, init_lora_weights="gaussian")),
    ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc", "wte"], **GPT2)),
    ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj"], use_dora=True, **GPT2)),
    ("gpt2", dict(r=4, target_modules=["c_attn"], lora_bias=True, **GPT2)),
]
CONFIG_IDS = [
    "llama-embed-mts",
    "llama-dora-embed",
    "mistral-all-linear",
    "gpt2-conv1d-wte",
    "gpt2-dora",
    "gpt2-lora-bias",
]


def _trained(kind: str, kwargs: dict, name: str = "default", seed: int = 0) -> PeftModel:
    with seeded(seed):
        model = get_peft_model(make_model(kind), LoraConfig(**kwargs), adapter_name=name)
    perturb_adapter(model, seed=seed + 1)
    return model.eval()


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own weights under their original names, whatever adapter layers wrap them."""
    out = {}
    for key, value in model.state_dict().items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        out[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value.detach().clone()
    return out


@pytest.mark.parametrize(("kind", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_default_init_leaves_outputs_unchanged(kind: str, kwargs: dict) -> None:
    ids = input_ids()
    base = logits(make_model(kind), ids)
    model = get_peft_model(make_model(kind), LoraConfig(**kwargs)).eval()
    assert max_diff(logits(model, ids), base) == 0.0


@pytest.mark.parametrize(("kind", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_disable_adapter_gives_base_outputs_and_adapter_comes_back(kind: str, kwargs: dict) -> None:
    ids = input_ids()
    base = logits(make_model(kind), ids)
    model = _trained(kind, kwargs)
    adapted = logits(model, ids)
    assert max_diff(adapted, base) > 1e-2
    with model.disable_adapter():
        assert max_diff(logits(model, ids), base) <= 1e-6
    assert max_diff(logits(model, ids), adapted) == 0.0
    # Also while merged: disabling unmerges, the block's end merges back.
    model.merge_adapter()
    with model.disable_adapter():
        assert max_diff(logits(model, ids), base) <= 1e-5
    assert max_diff(logits(model, ids), adapted) <= 1e-5


@pytest.mark.parametrize(("kind", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_merge_then_unmerge_restores_base_weights(kind: str, kwargs: dict) -> None:
    ids = input_ids()
    model = _trained(kind, kwargs)
    before = _base_state(model.get_base_model())
    adapted = logits(model, ids)
    model.merge_adapter()
    merged_state = _base_state(model.get_base_model())
    assert any(max_diff(merged_state[k], before[k]) > 1e-3 for k in before), (
        "merging must change base weights"
    )
    assert max_diff(logits(model, ids), adapted) <= 1e-4
    model.unmerge_adapter()
    after = _base_state(model.get_base_model())
    assert before.keys() == after.keys()
    assert max(max_diff(before[k], after[k]) for k in before) <= 1e-6
    assert max_diff(logits(model, ids), adapted) <= 1e-5


@pytest.mark.parametrize(("kind", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_merge_and_unload_gives_a_plain_model_that_saves_and_reloads(
    tmp_path: Path, kind: str, kwargs: dict
) -> None:
    from transformers import AutoModelForCausalLM

    ids = input_ids()
    model = _trained(kind, kwargs)
    adapted = logits(model, ids)
    merged = model.merge_and_unload()
    assert type(merged) is type(make_model(kind))
    assert max_diff(logits(merged, ids), adapted) <= 1e-4
    assert not [n for n, m in merged.named_modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]
    assert not [
        n for n, _ in merged.named_parameters() if "lora_" in n or "base_layer" in n or "modules_to_save" in n
    ]
    assert set(merged.state_dict()) == set(make_model(kind).state_dict())
    merged.save_pretrained(tmp_path)
    with quiet():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_diff(logits(reloaded, ids), adapted) <= 1e-4


@pytest.mark.parametrize(("kind", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_unload_restores_original_modules_and_outputs(kind: str, kwargs: dict) -> None:
    ids = input_ids()
    reference = make_model(kind)
    base = logits(reference, ids)
    model = _trained(kind, kwargs)
    model.merge_adapter()  # unload must unmerge first
    restored = model.unload()
    assert max_diff(logits(restored, ids), base) <= 1e-5
    for (name, module), (ref_name, ref_module) in zip(restored.named_modules(), reference.named_modules()):
        assert name == ref_name and type(module) is type(ref_module), name
    if kind == "llama":
        assert type(restored.model.layers[0].self_attn.q_proj) is nn.Linear
        assert type(restored.model.embed_tokens) is nn.Embedding


# ---- mixed-adapter batches ---------------------------------------------------------------------------

MIXED = [
    (
        "llama",
        dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"]),
        dict(
            r=2,
            target_modules=["v_proj", "o_proj", "embed_tokens"],
            use_dora=True,
            modules_to_save=["lm_head"],
        ),
    ),
    (
        "gpt2",
        dict(r=4, target_modules=["c_attn"], **GPT2),
        dict(r=2, target_modules=["c_attn", "c_proj"], lora_bias=True, **GPT2),
    ),
]


def _two_adapters(kind: str, a: dict, b: dict) -> PeftModel:
    with seeded(0):
        model = get_peft_model(make_model(kind), LoraConfig(**a), adapter_name="a")
        model.add_adapter("b", LoraConfig(**b))
    perturb_adapter(model, seed=1)  # adapter a (active, trainable)
    model.set_adapter("b")
    perturb_adapter(model, seed=2)
    return model.eval()


@pytest.mark.parametrize(("kind", "a", "b"), MIXED, ids=["llama", "gpt2"])
def test_mixed_batch_rows_equal_per_adapter_runs(kind: str, a: dict, b: dict) -> None:
    ids = input_ids(4, 6)
    model = _two_adapters(kind, a, b)
    single = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        single[name] = logits(model, ids)
    with model.disable_adapter():
        single[BASE_ROW] = logits(model, ids)
    assert max_diff(single["a"], single["b"]) > 1e-2 and max_diff(single["a"], single[BASE_ROW]) > 1e-2
    rows = ["a", BASE_ROW, "b", "a"]
    mixed = logits(model, ids, adapter_names=rows)
    for i, name in enumerate(rows):
        assert max_diff(mixed[i], single[name][i]) <= 1e-5, (i, name)

    generate = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    generated = model.generate(input_ids=ids, adapter_names=rows, **generate)
    per_adapter = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        per_adapter[name] = model.generate(input_ids=ids, **generate)
    with model.disable_adapter():
        per_adapter[BASE_ROW] = model.generate(input_ids=ids, **generate)
    assert generated.shape == (4, 11)
    for i, name in enumerate(rows):
        assert torch.equal(generated[i], per_adapter[name][i]), (i, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("kind", "a", "b"), MIXED, ids=["llama", "gpt2"])
def test_mixed_batch_rows_in_low_precision(kind: str, a: dict, b: dict, dtype: torch.dtype) -> None:
    """Each row is summed in float32 and rounded once, as in a single-adapter run."""
    with seeded(0):
        model = get_peft_model(make_model(kind, dtype=dtype), LoraConfig(**a), adapter_name="a")
        model.add_adapter("b", LoraConfig(**b))
    perturb_adapter(model, seed=1)
    model.set_adapter("b")
    perturb_adapter(model, seed=2)
    model.eval()
    ids = input_ids(4, 6)
    single = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        single[name] = logits(model, ids)
    rows = ["b", "a", "a", "b"]
    mixed = logits(model, ids, adapter_names=rows)
    for i, name in enumerate(rows):
        assert max_diff(mixed[i], single[name][i]) <= 1e-3, (i, name)


def test_mixed_batch_matches_peft() -> None:
    peft = pytest.importorskip("peft")
    kind, a, b = MIXED[1]
    ids = input_ids(4, 6)
    ours = _two_adapters(kind, a, b)
    with seeded(0), quiet():
        theirs = peft.get_peft_model(make_model(kind), peft.LoraConfig(**a), adapter_name="a")
        theirs.add_adapter("b", peft.LoraConfig(**b))
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    rows = ["a", BASE_ROW, "b", "a"]
    assert max_diff(logits(ours, ids, adapter_names=rows), logits(theirs, ids, adapter_names=rows)) <= 1e-5


def test_mixed_batch_rejects_unknown_adapter_and_merged_model() -> None:
    model = _two_adapters(*MIXED[1])
    with pytest.raises(ValueError, match="unknown adapter"):
        model(input_ids=input_ids(2), adapter_names=["a", "nope"])
    with pytest.raises(ValueError, match="should be the same as the number of inputs, but got 3 and 2"):
        model(input_ids=input_ids(2), adapter_names=["a", "b", "a"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model(input_ids=input_ids(2), adapter_names=["a", "b"])


# ---- adapters by name --------------------------------------------------------------------------------

Q = dict(r=4, target_modules=["q_proj", "v_proj"])
K = dict(r=2, target_modules=["k_proj", "v_proj"], modules_to_save=["lm_head"])


def test_add_set_delete_adapter_and_active_adapter() -> None:
    ids = input_ids()
    base = logits(make_model("llama"), ids)
    model = _trained("llama", Q)
    first = logits(model, ids)
    model.add_adapter("other", LoraConfig(**K, init_lora_weights=False))
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert max_diff(logits(model, ids), first) == 0.0, "a new adapter is not active"
    model.set_adapter("other")
    assert model.active_adapter == "other" and model.active_peft_config is model.peft_config["other"]
    second = logits(model, ids)
    assert max_diff(second, first) > 1e-3 and max_diff(second, base) > 1e-3
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("other", LoraConfig(**Q))
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter("missing")
    with pytest.raises(ValueError, match="folder name"):
        model.add_adapter("../evil", LoraConfig(**Q))
    model.set_adapter("default")
    assert max_diff(logits(model, ids), first) == 0.0
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert not [n for n, _ in model.named_parameters() if ".other." in n]
    assert max_diff(logits(model, ids), first) == 0.0
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        model.delete_adapter("default")
    with pytest.raises(ValueError, match="does not exist"):
        model.delete_adapter("other")


def test_deleting_the_active_adapter_activates_the_first_remaining() -> None:
    ids = input_ids()
    model = _trained("llama", Q, name="zeta")
    model.add_adapter("beta", LoraConfig(**K, init_lora_weights=False))
    model.add_adapter("alpha", LoraConfig(**Q, init_lora_weights=False))
    model.set_adapter("beta")
    model.delete_adapter("beta")
    # PEFT's rule: the first remaining adapter by name, activated as set_adapter does (trainable).
    assert model.active_adapter == "alpha"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".alpha." in n for n in trainable)
    alpha_only = logits(model, ids)
    model.set_adapter("zeta")
    assert max_diff(logits(model, ids), alpha_only) > 1e-3


def test_base_model_and_get_base_model() -> None:
    inner = make_model("llama")
    model = get_peft_model(inner, LoraConfig(**Q))
    assert model.get_base_model() is inner
    assert model.base_model.model is inner
    assert (
        model.config is inner.config and model.device == torch.device("cpu") and model.dtype == torch.float32
    )
    names = {n for n, _ in model.named_parameters()}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in names
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in names


def test_generate_through_peft_model() -> None:
    ids = input_ids(2, 5)
    model = _trained("llama", Q)
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    merged = model.merge_and_unload()
    expected = merged.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, expected)
    assert out.shape == (2, 9)


# ---- loading ------------------------------------------------------------------------------------------

def test_from_pretrained_arguments(tmp_path: Path) -> None:
    ids = input_ids()
    source = _trained("llama", dict(Q, lora_dropout=0.2))
    expected = logits(source, ids)
    source.save_pretrained(tmp_path)

    frozen = PeftModel.from_pretrained(make_model("llama"), tmp_path, adapter_name="mine")
    assert list(frozen.peft_config) == ["mine"] and frozen.active_adapter == "mine"
    assert frozen.get_nb_trainable_parameters()[0] == 0
    assert not frozen.training, "loaded for inference: eval mode (no dropout)"
    assert max_diff(logits(frozen, ids), expected) <= 1e-6
    assert frozen.peft_config["mine"].inference_mode is True

    trainable = PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    # q_proj (32→32) and v_proj (32→16) at r=4 in 2 layers: 2 · (4·32 + 32·4 + 4·32 + 16·4)
    assert trainable.get_nb_trainable_parameters()[0] == 896
    assert trainable.training
    assert trainable.peft_config["default"].inference_mode is False

    half = PeftModel.from_pretrained(make_model("llama"), tmp_path, torch_dtype=torch.bfloat16)
    dtypes = {p.dtype for n, p in half.named_parameters() if "lora_" in n}
    assert dtypes == {torch.bfloat16}
    assert max_diff(logits(half, ids), expected) <= 5e-2


def test_load_adapter_does_not_activate(tmp_path: Path) -> None:
    ids = input_ids()
    _trained("llama", K, seed=5).save_pretrained(tmp_path)
    model = _trained("llama", Q)
    first = logits(model, ids)
    model.load_adapter(tmp_path, adapter_name="loaded")
    assert model.active_adapter == "default"
    assert max_diff(logits(model, ids), first) == 0.0
    assert not [n for n, p in model.named_parameters() if ".loaded." in n and p.requires_grad]
    model.set_adapter("loaded")
    reference = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    assert max_diff(logits(model, ids), logits(reference, ids)) <= 1e-6


def test_save_pretrained_puts_other_adapters_in_subfolders(tmp_path: Path) -> None:
    ids = input_ids()
    model = _trained("llama", Q)
    model.add_adapter("second", LoraConfig(**K, init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (
        tmp_path / "second" / "adapter_config.json"
    ).is_file()
    model.save_pretrained(tmp_path / "only", selected_adapters=["second"])
    assert not (tmp_path / "only" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "only" / "second")
    model.set_adapter("second")
    assert max_diff(logits(loaded, ids), logits(model, ids)) <= 1e-6
    with pytest.raises(ValueError, match="unknown adapter"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])


def test_merge_and_unload_safe_merge_refuses_nan_adapter() -> None:
    ids = input_ids()
    model = _trained("llama", Q)
    before = _base_state(model.get_base_model())
    adapted = logits(model, ids)
    with torch.no_grad():
        model.get_base_model().model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj.*NaN"):
        model.merge_and_unload(safe_merge=True)
    # Nothing was merged or unloaded: the layers merged before the bad one were restored.
    after = _base_state(model.get_base_model())
    assert max(max_diff(before[k], after[k]) for k in before) <= 1e-6
    assert all(not layer.merged for _, layer in lora_layers(model.get_base_model()))
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj, LoraLayer)
    with torch.no_grad():
        model.get_base_model().model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = 0.0
    assert torch.isfinite(logits(model, ids)).all() and max_diff(logits(model, ids), adapted) < 1.0


def test_auto_peft_model_for_causal_lm(tmp_path: Path) -> None:
    pytest.importorskip("lorakit.models.sources")
    from lorakit import AutoPeftModelForCausalLM

    ids = input_ids()
    make_model("llama").save_pretrained(tmp_path / "base")
    source = _trained("llama", Q)
    source.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    source.save_pretrained(tmp_path / "adapter")
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(model, PeftModel)
    assert max_diff(logits(model, ids), logits(source, ids)) <= 1e-5
    assert lorakit.AutoPeftModelForCausalLM is AutoPeftModelForCausalLM
