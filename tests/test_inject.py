"""Which modules a LoraConfig adapts (`lorakit.inject.find_targets`), as a table of cases with the expected
module names written out, and the errors for targets that match nothing."""

from __future__ import annotations

import re

import pytest
from tiny_models import tiny_gpt2, tiny_llama
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.inject import find_targets, new_adapter_config

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def llama(layer: int, *names: str) -> list[str]:
    return [f"model.layers.{layer}.{name}" for name in names]


def both(*names: str) -> list[str]:
    """The named modules of layer 0, then of layer 1."""
    return llama(0, *names) + llama(1, *names)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.v = nn.Linear(4, 4)


class Blocks(nn.Module):
    """Layers under a name the default layer-index rule does not find (`blocks.<i>.` at the top level)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(4, 8)


Q, K, V, OUT = ATTENTION
NO_MODULE = "matched no module of LlamaForCausalLM"
NOTHING_LEFT = "nothing is left to adapt"

LLAMA_CASES = {
    "list of names": (dict(target_modules=["q_proj", "v_proj"]), both(Q, V)),
    "full module name": (dict(target_modules=["model.layers.1.self_attn.q_proj"]), llama(1, Q)),
    "name must end at a dot": (dict(target_modules=["proj"]), NO_MODULE),
    "regex over the whole name": (dict(target_modules=r".*\.0\.self_attn\.(q|k)_proj"), llama(0, Q, K)),
    "regex matching a suffix only": (dict(target_modules=r"q_proj"), NO_MODULE),
    "default for llama": (dict(target_modules=None), both(Q, V)),
    "all-linear, head left out": (dict(target_modules="all-linear"), both(*ATTENTION, *MLP)),
    "all-linear minus exclude list": (
        dict(target_modules="all-linear", exclude_modules=["down_proj", "k_proj"]),
        both(Q, V, OUT, "mlp.gate_proj", "mlp.up_proj")),
    "exclude regex": (dict(target_modules=["q_proj", "o_proj"], exclude_modules=r".*\.1\..*"),
                      llama(0, Q, OUT)),
    "layers_to_transform list": (dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
                                 llama(1, Q, "mlp.up_proj")),
    "layers_to_transform int": (dict(target_modules=["v_proj"], layers_to_transform=0), llama(0, V)),
    "layers_pattern": (dict(target_modules=["v_proj"], layers_to_transform=[1], layers_pattern="layers"),
                       llama(1, V)),
    "full name ignores layers_to_transform": (
        dict(target_modules=["model.layers.0.self_attn.q_proj"], layers_to_transform=[1]), llama(0, Q)),
    "modules_to_save left out": (dict(target_modules=["q_proj", "v_proj"], modules_to_save=["v_proj"]),
                                 both(Q)),
    "modules_to_save parent left out": (dict(target_modules="all-linear", modules_to_save=["mlp"]),
                                        both(*ATTENTION)),
    "embedding and head": (dict(target_modules=["embed_tokens", "lm_head"]),
                           ["model.embed_tokens", "lm_head"]),
    "one entry missing": (dict(target_modules=["q_proj", "qq_proj"]), "'qq_proj' " + NO_MODULE),
    "regex matching nothing": (dict(target_modules=r"nothing\..*"), NO_MODULE),
    "everything excluded": (dict(target_modules=["k_proj"], exclude_modules=["k_proj"]), NOTHING_LEFT),
    "all layers filtered out": (dict(target_modules=["k_proj"], layers_to_transform=[5]), NOTHING_LEFT),
}


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_targets(case: str) -> None:
    options, expected = LLAMA_CASES[case]
    config = LoraConfig(**options)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=re.escape(expected)):
            find_targets(tiny_llama(), config)
    else:
        assert find_targets(tiny_llama(), config) == expected


BLOCKS_CASES = {
    "layer index found by layers_pattern": (
        dict(target_modules=["q"], layers_to_transform=[1], layers_pattern="blocks"), ["blocks.1.q"]),
    "pattern list": (
        dict(target_modules=["q", "v"], layers_to_transform=[0, 2], layers_pattern=["stack", "blocks"]),
        ["blocks.0.q", "blocks.0.v", "blocks.2.q", "blocks.2.v"]),
    # Without the pattern the default rule finds no layer index in "blocks.1.q", so every match is dropped.
    "no layers_pattern": (dict(target_modules=["q"], layers_to_transform=[1]), "nothing is left to adapt"),
    "no default targets": (dict(target_modules=None), "no default for model type None"),
}


@pytest.mark.parametrize("case", BLOCKS_CASES)
def test_custom_model_targets(case: str) -> None:
    options, expected = BLOCKS_CASES[case]
    config = LoraConfig(**options)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=re.escape(expected)):
            find_targets(Blocks(), config)
    else:
        assert find_targets(Blocks(), config) == expected


def test_all_linear_takes_gpt2_conv1d_layers_but_not_the_tied_head() -> None:
    expected = [f"transformer.h.{i}.{name}" for i in (0, 1)
                for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert find_targets(tiny_gpt2(), LoraConfig(target_modules="all-linear")) == expected


def test_modules_already_wrapped_for_modules_to_save_are_not_targeted_again() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    base = model.get_base_model()
    assert find_targets(base, LoraConfig(target_modules=["q_proj", "lm_head"])) == both(Q)


def test_module_that_is_not_linear_or_embedding_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn: cannot adapt a LlamaAttention"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["model.layers.0.self_attn"]))


def test_missing_modules_to_save_is_refused_and_the_model_left_as_it_was() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="modules_to_save: 'score' matched no module of LlamaForCausalLM"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["score"]))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_the_callers_config_is_never_changed() -> None:
    config = LoraConfig(target_modules="all-linear")
    base = tiny_llama()
    base.name_or_path = "tiny/llama"
    model = get_peft_model(base, config)
    assert config.target_modules == "all-linear" and config.base_model_name_or_path is None
    recorded = model.peft_config["default"]
    assert recorded.base_model_name_or_path == "tiny/llama"
    assert recorded is not config and recorded.target_modules == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    kept = LoraConfig(target_modules=None, inference_mode=False)
    copy = new_adapter_config(tiny_llama(), "other", kept, {})
    assert kept.target_modules is None and copy.target_modules == ["q_proj", "v_proj"]
    listed = LoraConfig(target_modules=["q_proj"], base_model_name_or_path="base")
    model = get_peft_model(tiny_llama(), listed)
    listed.r = 2  # the caller reuses its config: the adapter's own copy does not follow
    assert model.peft_config["default"].r == 8


def test_a_second_adapter_training_biases_is_refused() -> None:
    existing = {"a": LoraConfig(target_modules=["q_proj"], bias="all")}
    with pytest.raises(ValueError, match="adapter 'a' already trains the base biases"):
        new_adapter_config(tiny_llama(), "b", LoraConfig(target_modules=["q_proj"], bias="lora_only"),
                           existing)
    with pytest.raises(ValueError, match="adapter 'a' already exists"):
        new_adapter_config(tiny_llama(), "a", LoraConfig(target_modules=["q_proj"]), existing)
    added = new_adapter_config(tiny_llama(), "b", LoraConfig(target_modules=["q_proj"]), existing)
    assert added.target_modules == ["q_proj"] and added.bias == "none"


@pytest.mark.parametrize("is_trainable", [False, True])
def test_from_pretrained_keeps_a_passed_config_as_peft_does(tmp_path, is_trainable: bool) -> None:
    """PEFT keeps the caller's config object and sets its inference_mode to `not is_trainable`."""
    from lorakit import PeftModel

    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    config = LoraConfig(target_modules=["q_proj"], inference_mode=is_trainable)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, config=config, is_trainable=is_trainable)
    assert loaded.peft_config["default"] is config and config.inference_mode is (not is_trainable)
    assert any(p.requires_grad for p in loaded.parameters()) is is_trainable
