"""LoRA Linear's no-grad path (generation, evaluation): the same numbers as the general path, taken whenever
it applies, and kept current as adapters are added, switched, disabled, merged, rescaled or deleted."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from tiny_models import input_ids, make_model, max_diff, perturb_adapter, seeded

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.layers import LoraLinear


def _layers(model: PeftModel) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def _two_adapters(kind: str = "llama", **config) -> PeftModel:
    """A model with adapters 'a' (active) and 'b', both with non-zero updates."""
    settings = dict(r=4, target_modules="all-linear")
    settings.update(config)
    with seeded(0):
        model = get_peft_model(make_model(kind), LoraConfig(**settings), adapter_name="a")
        model.add_adapter("b", LoraConfig(**settings))
    for name in ("a", "b"):
        model.set_adapter(name)
        perturb_adapter(model, seed=ord(name))
    model.set_adapter("a")
    return model.eval()


@contextmanager
def _general_path_calls(model: PeftModel) -> Iterator[list[str]]:
    """Within the block, the module name of every LoRA Linear call that does not take the plain path
    (`LoraLinear.takes_plain_path`, asked with the call's own input and base output)."""
    calls: list[str] = []

    def record(layer: LoraLinear, args: tuple, output: torch.Tensor) -> None:
        if not layer.takes_plain_path(args[0], layer.base_layer(args[0])):
            calls.append(layer.module_name)

    handles = [layer.register_forward_hook(record) for layer in _layers(model)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _outputs(model: PeftModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits under no_grad (the planned path) and with autograd on (the general path)."""
    ids = input_ids()
    with torch.no_grad():
        planned = model(input_ids=ids).logits
    with torch.enable_grad():
        general = model(input_ids=ids).logits.detach()
    return planned, general


def _switch(model: PeftModel) -> None:
    model.set_adapter("b")


def _both_active(model: PeftModel) -> None:
    for layer in _layers(model):
        layer.set_active(["a", "b"])


def _rescale(model: PeftModel) -> None:
    # In-place edits of `scaling` (PEFT's set_scale, user code) must show without any state change.
    for layer in _layers(model):
        layer.scaling["a"] *= 3.0


def _delete_active(model: PeftModel) -> None:
    model.delete_adapter("a")


STATES: dict[str, Callable[[PeftModel], None]] = {
    "one adapter": lambda model: None,
    "switched": _switch,
    "two active": _both_active,
    "rescaled in place": _rescale,
    "active deleted": _delete_active,
}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("state", list(STATES))
def test_no_grad_forward_equals_general_path_and_takes_the_plan(kind: str, state: str) -> None:
    model = _two_adapters(kind, **({"fan_in_fan_out": True} if kind == "gpt2" else {}))
    base = make_model(kind)
    with torch.no_grad():
        base_logits = base(input_ids=input_ids()).logits
    STATES[state](model)
    with _general_path_calls(model) as calls:
        planned, general = _outputs(model)
        assert len(calls) > 0, "the grad-enabled forward takes the general path"
        calls.clear()
        with torch.no_grad():
            model(input_ids=input_ids())
    assert calls == [], "the no-grad forward takes the plain path"
    assert max_diff(planned, general) < 1e-6
    assert max_diff(planned, base_logits) > 1e-3, "the adapters change the output"


def test_no_grad_path_follows_disable_merge_and_unmerge() -> None:
    model = _two_adapters()
    ids = input_ids()
    with torch.no_grad(), _general_path_calls(model) as calls:
        base_logits = make_model("llama")(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            assert max_diff(model(input_ids=ids).logits, base_logits) < 1e-6
        model.merge_adapter()
        # Merged: the planned path adds nothing more (adding the update twice would differ by ~the update).
        assert max_diff(model(input_ids=ids).logits, adapted) < 1e-4
        model.unmerge_adapter()
        assert max_diff(model(input_ids=ids).logits, adapted) < 1e-5
        assert calls == []


def test_dropout_is_applied_in_train_mode_even_without_grad() -> None:
    model = _two_adapters(lora_dropout=0.5)
    planned, general = _outputs(model)
    assert max_diff(planned, general) < 1e-6, "eval mode: dropout is the identity on both paths"
    model.train()
    with torch.no_grad(), _general_path_calls(model) as calls:
        first = model(input_ids=input_ids()).logits
        second = model(input_ids=input_ids()).logits
    assert calls, "train mode with dropout takes the general path"
    assert max_diff(first, second) > 1e-4, "dropout draws differ between calls"


@pytest.mark.parametrize("config", [{"use_dora": True}, {"lora_bias": True}], ids=["dora", "lora_bias"])
def test_dora_and_lora_bias_keep_the_general_path(config: dict) -> None:
    model = _two_adapters(**config)
    with torch.no_grad(), _general_path_calls(model) as calls:
        model(input_ids=input_ids())
    assert len(calls) == len(_layers(model)), "every layer takes the general path"
    planned, general = _outputs(model)
    assert max_diff(planned, general) < 1e-6


def test_low_precision_base_with_float32_adapters_rounds_once() -> None:
    with seeded(0):
        model = get_peft_model(
            make_model("llama", dtype=torch.bfloat16), LoraConfig(r=4, target_modules="all-linear")
        )
    perturb_adapter(model)
    with torch.no_grad(), _general_path_calls(model) as calls:
        model(input_ids=input_ids())
    assert calls, "bfloat16 inputs and float32 factors: the general path casts and rounds once"


def test_no_grad_layer_output_is_the_hand_computed_lora_sum() -> None:
    model = _two_adapters()
    layer = _layers(model)[0]
    layer.set_active(["a", "b"])
    layer.scaling["b"] = 0.75
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
    expected = layer.base_layer(x)
    for name in ("a", "b"):
        a, b = layer.factors(name)
        expected = expected + layer.scaling[name] * (x @ a.T @ b.T)
    with torch.no_grad():
        assert max_diff(layer(x), expected) < 1e-5
