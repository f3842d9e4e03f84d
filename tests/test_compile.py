"""torch.compile: LoRA layers trace without graph breaks, compiled training equals eager training, and
`--compile` compiles only the training loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import input_ids, make_model, max_diff, perturb_adapter, seeded
from torch._dynamo.utils import counters

from lorakit import LoraConfig, get_peft_model
from lorakit.train.compile import compiled_decoder_layers, decoder_layers
from lorakit.train.config import TrainConfig
from lorakit.train.sft import train


def _lora(kind: str = "llama"):
    with seeded(0):
        model = get_peft_model(make_model(kind), LoraConfig(r=4, target_modules="all-linear"))
    perturb_adapter(model)
    return model


def _loss_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = input_ids(batch=3, length=9)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lora_decoder_layers_compile_whole_and_match_eager(kind: str) -> None:
    model = _lora(kind).eval()  # gradients still flow; eval mode only turns GPT-2's own dropout off
    eager_loss, eager_grads = _loss_and_grads(model)
    layers = decoder_layers(model)
    assert len(layers) == 2
    for layer in layers:
        # fullgraph: a graph break anywhere in a layer (a LoRA layer's Python included) is an error.
        layer.compile(fullgraph=True)
    loss, grads = _loss_and_grads(model)
    assert abs(loss.item() - eager_loss.item()) < 1e-5
    assert grads.keys() == eager_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert max_diff(grad, eager_grads[name]) < 1e-5, name


def test_compiled_layers_see_mixed_adapter_rows() -> None:
    with seeded(0):
        model = get_peft_model(
            make_model("llama"), LoraConfig(r=4, target_modules="all-linear"), adapter_name="a"
        )
        model.add_adapter("b", LoraConfig(r=4, target_modules="all-linear"))
    perturb_adapter(model)
    model.set_adapter("b")
    perturb_adapter(model, seed=11)
    model.eval()
    ids = input_ids(batch=3)
    rows = ["a", "__base__", "b"]
    with torch.no_grad():
        eager = model(input_ids=ids, adapter_names=rows).logits
        for layer in decoder_layers(model):
            # Not fullgraph: the stacked mixed-rows path caches factor stacks and breaks the graph there. What
            # is tested is that traced code reads the rows (under compile, from row_adapters' global).
            layer.compile()
        compiled = model(input_ids=ids, adapter_names=rows).logits
        plain = model(input_ids=ids).logits
    assert max_diff(compiled, eager) < 1e-5
    assert max_diff(plain[2], eager[2]) < 1e-5 and max_diff(plain[0], eager[0]) > 1e-3, \
        "rows follow adapter_names under compile, not the active adapter"


def test_compiled_block_is_undone_on_exit() -> None:
    model = _lora()
    with compiled_decoder_layers(model) as count:
        assert count == 2
        assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    with compiled_decoder_layers(model, enabled=False) as count:
        assert count == 0


def test_model_without_decoder_layer_classes_is_refused() -> None:
    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="--compile.*_no_split_modules"):
        with compiled_decoder_layers(get_peft_model(Plain(), LoraConfig(r=2, target_modules=["proj"]))):
            pass


def _train_losses(output: Path) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_train_with_compile_gives_the_eager_losses(
    tmp_path: Path, tiny_chat_model_dir: Path, demo_subset
) -> None:
    options = dict(model=str(tiny_chat_model_dir), data=str(demo_subset["train"]),
                   validation_data=str(demo_subset["validation"]), max_steps=4, eval_every=2, batch_size=4,
                   learning_rate=5e-3, warmup_steps=0, lora_dropout=0.0, seed=3)
    eager = train(TrainConfig.from_options({**options, "output": str(tmp_path / "eager")}))
    counters.clear()
    compiled = train(
        TrainConfig.from_options({**options, "output": str(tmp_path / "compiled"), "compile": True})
    )
    assert counters["stats"]["unique_graphs"] >= 1, "the compiled run compiled something"
    eager_losses, compiled_losses = _train_losses(tmp_path / "eager"), _train_losses(tmp_path / "compiled")
    assert len(compiled_losses) == 4
    assert max(abs(a - b) for a, b in zip(eager_losses, compiled_losses)) < 1e-5
    assert abs(compiled.report["final_val_loss"] - eager.report["final_val_loss"]) < 1e-5
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(compiled.model)), \
        "the returned model runs eagerly"
