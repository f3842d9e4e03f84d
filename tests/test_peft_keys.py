"""PEFT's saved-key grammar (`lorakit.io.peft_keys`) as a table: key → (module, role, parameter,
embedding)."""

from __future__ import annotations

import pytest

from lorakit.io.peft_keys import in_modules_to_save, names_lora_tensor, parse_key, saved_key

P = "base_model.model."

PARSED = {
    P + "model.layers.0.self_attn.q_proj.lora_A.weight": ("model.layers.0.self_attn.q_proj", "A", "", False),
    P + "transformer.h.1.attn.c_attn.lora_B.weight": ("transformer.h.1.attn.c_attn", "B", "", False),
    P + "model.layers.0.mlp.up_proj.lora_B.bias": ("model.layers.0.mlp.up_proj", "bias", "", False),
    P + "model.embed_tokens.lora_embedding_A": ("model.embed_tokens", "A", "", True),
    P + "model.embed_tokens.lora_embedding_B": ("model.embed_tokens", "B", "", True),
    P + "model.layers.1.self_attn.v_proj.lora_magnitude_vector": (
        "model.layers.1.self_attn.v_proj", "magnitude", "", False),
    P + "model.layers.1.self_attn.v_proj.lora_magnitude_vector.weight": (
        "model.layers.1.self_attn.v_proj", "magnitude", "", False),
    P + "transformer.h.0.attn.c_attn.base_layer.bias": ("transformer.h.0.attn.c_attn", "base", "bias", False),
    P + "model.embed_tokens.base_layer.weight": ("model.embed_tokens", "base", "weight", False),
    P + "lm_head.weight": ("lm_head", "tensor", "weight", False),
    P + "score.dense.bias": ("score.dense", "tensor", "bias", False),
    P + "bias": ("", "tensor", "bias", False),
    # "lora" inside a module name is not a LoRA attribute.
    P + "flora_head.weight": ("flora_head", "tensor", "weight", False),
    P + "x.flora_A.weight": ("x.flora_A", "tensor", "weight", False),
}


@pytest.mark.parametrize("key", PARSED)
def test_parse_key(key: str) -> None:
    parsed = parse_key(key)
    assert (parsed.module, parsed.role, parsed.param, parsed.embedding) == PARSED[key]


@pytest.mark.parametrize(("key", "message"), [
    ("model.layers.0.q_proj.lora_A.weight", "is not under 'base_model.model.'"),
    (P + "model.layers.0.q_proj.lora_C.weight", "is not a LoRA tensor lorakit knows"),
    (P + "model.layers.0.q_proj.lora_A.default.weight", "is not a LoRA tensor lorakit knows"),
])
def test_parse_key_refuses(key: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_key(key)


def test_parameter_name_drops_base_layer() -> None:
    assert parse_key(P + "a.c_attn.base_layer.bias").parameter == "a.c_attn.bias"
    assert parse_key(P + "lm_head.weight").parameter == "lm_head.weight"
    assert parse_key(P + "bias").parameter == "bias"


def test_saved_key_and_lora_names() -> None:
    assert saved_key("model.embed_tokens", "lora_embedding_A") == P + "model.embed_tokens.lora_embedding_A"
    assert names_lora_tensor("x.lora_B.default.bias") and not names_lora_tensor("x.flora.bias")


@pytest.mark.parametrize(("module", "entries", "expected"), [
    ("lm_head", ["lm_head"], True),
    ("model.score", ["score"], True),
    ("model.score.dense", ["score"], True),  # inside a saved module
    ("model.scores", ["score"], False),  # whole dotted parts only
    ("model.layers.0.mlp", ["layers.0.mlp"], True),
    ("model.layers.10.mlp", ["layers.0.mlp"], False),
    ("lm_head", None, False),
])
def test_in_modules_to_save(module: str, entries: list[str] | None, expected: bool) -> None:
    assert in_modules_to_save(module, entries) is expected
