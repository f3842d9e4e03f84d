"""bf16/fp16 bases on the CPU: float32 LoRA factors and optimizer states, the forward under autocast, float32
losses, PEFT parity in bf16, merging into bf16 with one rounding, fp16 loss scaling, and --device/--dtype.

The same checks run on CUDA in tests/test_cuda.py (marked `cuda`); these run everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import input_ids, make_model, max_diff, perturb_adapter, quiet

import lorakit
from lorakit.device import resolve_device, resolve_dtype
from lorakit.errors import LorakitError
from lorakit.layers import LoraLayer
from lorakit.train.config import TrainConfig
from lorakit.train.loss import causal_lm_loss
from lorakit.train.precision import Precision, keep_trainable_float32
from lorakit.train.sft import train

peft = pytest.importorskip("peft")

BF16 = torch.bfloat16
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained-looking (perturbed) r=8 adapter on every linear layer of the tiny Llama, saved."""
    config = lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = lorakit.get_peft_model(make_model("llama"), config)
    perturb_adapter(model, scale=0.1)
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(directory)
    return directory


def _load(lib, directory: Path, dtype: torch.dtype = torch.float32, trainable: bool = False):
    with quiet():
        return lib.PeftModel.from_pretrained(
            make_model("llama", dtype=dtype), directory, is_trainable=trainable
        )


def _autocast_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), Precision(CPU, BF16).autocast():
        return model(input_ids=ids).logits.float()


def test_bf16_base_keeps_float32_factors_and_matches_peft_under_autocast(saved_adapter: Path) -> None:
    ids = input_ids(4, 12)
    ours, theirs = _load(lorakit, saved_adapter, BF16), _load(peft, saved_adapter, BF16)
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" not in n} == {BF16}
    with torch.no_grad():  # without autocast both compute the update in float32 and round once: identical
        assert max_diff(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) == 0.0
    # The float32 reference: the same bf16-rounded base weights, float32 arithmetic throughout.
    with quiet():
        reference = lorakit.PeftModel.from_pretrained(make_model("llama", dtype=BF16).float(), saved_adapter)
    expected = reference(input_ids=ids).logits.detach()
    ours_logits, theirs_logits = _autocast_logits(ours, ids), _autocast_logits(theirs, ids)
    # Both run the factors' matmuls as bf16 kernels and differ only in where the bf16 roundings fall.
    # Measured (logits up to 0.38): 0.0156 apart (one bf16 ulp at 2-4), 0.0184 and 0.0122 from the reference.
    assert max_diff(ours_logits, theirs_logits) <= 0.03
    assert max_diff(ours_logits, expected) <= max(2 * max_diff(theirs_logits, expected), 1e-3)


def _loss_and_grads(model, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Answer-only loss (the second half of each row supervised) and the factors' gradients."""
    ids = input_ids(2, 10)
    labels = ids.clone()
    labels[:, :5] = -100
    model.train()
    with Precision(CPU, BF16 if autocast else torch.float32).autocast():
        loss, count = causal_lm_loss(model, ids, torch.ones_like(ids), labels)
    assert int(count) == 2 * 5
    loss.backward()
    return loss, {
        n.removeprefix("base_model.model."): p.grad for n, p in model.named_parameters() if p.requires_grad
    }


def _relative_error(grads: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    error = torch.cat([(grads[n] - expected[n]).flatten() for n in expected])
    return (error.norm() / torch.cat([g.flatten() for g in expected.values()]).norm()).item()


def test_loss_and_factor_gradients_are_float32_under_autocast(saved_adapter: Path) -> None:
    with quiet():  # the float32 reference: the same bf16-rounded base weights, float32 arithmetic
        full = lorakit.PeftModel.from_pretrained(
            make_model("llama", dtype=BF16).float(), saved_adapter, is_trainable=True
        )
    reference, expected = _loss_and_grads(full, autocast=False)
    loss, grads = _loss_and_grads(_load(lorakit, saved_adapter, BF16, trainable=True), autocast=True)
    _, peft_grads = _loss_and_grads(_load(peft, saved_adapter, BF16, trainable=True), autocast=True)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - reference.item()) <= 1e-3 * reference.item()  # measured 5e-5 relative
    assert set(grads) == set(expected) and all(g.dtype == torch.float32 for g in grads.values())
    # bf16 activations in the backward: measured 4.2 % (all factors' gradients together) against PEFT's 3.9 %.
    assert _relative_error(grads, expected) <= max(1.5 * _relative_error(peft_grads, expected), 1e-3)


def test_merge_into_a_bf16_base_rounds_once(saved_adapter: Path) -> None:
    model = _load(lorakit, saved_adapter, BF16)
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_A"):
            weight = module.base_layer.weight.detach().float()
            expected[name] = (weight + module.delta_weight("default").float()).to(BF16)
    assert expected
    merged = model.merge_and_unload()
    for name, weight in expected.items():
        layer = merged.get_submodule(name.removeprefix("base_model.model."))
        assert layer.weight.dtype == BF16
        assert torch.equal(layer.weight, weight), name


def test_fp16_loss_scaling_unscales_exactly_and_skips_inf_steps() -> None:
    class Accelerator:
        def backward(self, loss: torch.Tensor) -> None:
            loss.backward()

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    layer(x).square().sum().backward()
    unscaled = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    precision = Precision(CPU, torch.float16)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    precision.backward(Accelerator(), layer(x).square().sum())
    precision.unscale(optimizer)
    # The scale is a power of two (65536), so dividing by it is exact.
    assert all(torch.equal(p.grad, g) for p, g in zip(layer.parameters(), unscaled))
    expected = [torch.add(p.detach(), g, alpha=-0.1) for p, g in zip(layer.parameters(), unscaled)]
    precision.step(optimizer)  # finite gradients: the plain SGD step
    assert all(torch.equal(p, e) for p, e in zip(layer.parameters(), expected))
    for param in layer.parameters():
        param.grad = torch.full_like(param, float("inf"))
    scale = precision.scaler.get_scale()
    precision.step(optimizer)  # an overflow: no step, and the scale halves
    assert all(torch.equal(p, e) for p, e in zip(layer.parameters(), expected))
    assert precision.scaler.get_scale() == scale / 2


def test_trainable_weights_of_a_half_base_become_float32() -> None:
    model = make_model("llama", dtype=BF16)
    model.lm_head.weight.requires_grad_(True)
    model.model.norm.weight.requires_grad_(False)
    assert keep_trainable_float32(model) >= 1
    assert model.lm_head.weight.dtype == torch.float32 and model.model.norm.weight.dtype == BF16


def test_device_and_dtype_options() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_dtype("fp16", CPU) == torch.float16
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU and resolve_dtype("auto", CPU) == torch.float32
    with pytest.raises(LorakitError, match="--device cuda:99"):
        resolve_device("cuda:99")  # no machine has a hundred GPUs
    with pytest.raises(ValueError, match="--device"):
        TrainConfig.from_options({"device": "gpu"})
    with pytest.raises(ValueError, match="--dtype fp16 with --fsdp"):
        TrainConfig.from_options({"dtype": "fp16", "fsdp": True})


def _losses(output: Path) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_bf16_training_steps_follow_float32_with_float32_adapter_and_optimizer_state(
    tmp_path, tiny_chat_model_dir, demo_subset
) -> None:
    options = dict(
        model=str(tiny_chat_model_dir),
        data=str(demo_subset["train"]),
        max_steps=4,
        eval_every=100,
        save_every=2,
        batch_size=4,
        learning_rate=5e-3,
        warmup_steps=0,
        seed=3,
        device="cpu",
    )
    runs = {
        dtype: train(TrainConfig.from_options({**options, "dtype": dtype, "output": str(tmp_path / dtype)}))
        for dtype in ("fp32", "bf16")
    }
    model = runs["bf16"].model
    assert model.config._attn_implementation == "sdpa"
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {BF16}
    state = torch.load(tmp_path / "bf16" / "checkpoint" / "optimizer.pt", weights_only=False)["optimizer"][
        "state"
    ]
    assert state and {t.dtype for s in state.values() for k, t in s.items() if k != "step"} == {torch.float32}
    bf16, fp32 = _losses(tmp_path / "bf16"), _losses(tmp_path / "fp32")
    # Same data, same initialisation, the base rounded to bf16: measured at most 3e-5 relative per step.
    assert len(bf16) == len(fp32) == 4
    assert all(abs(a - b) <= 1e-3 * b for a, b in zip(bf16, fp32)), (bf16, fp32)
    assert bf16[-1] < bf16[0]


def test_eval_of_a_bf16_base_on_the_cpu_scores_like_float32(tiny_chat_model_dir, demo_subset) -> None:
    from lorakit.cli.common import load_model_with_adapters
    from lorakit.train.evaluate import EvalConfig, evaluate_models

    losses = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", BF16)):
        model, tokenizer, adapters = load_model_with_adapters(
            str(tiny_chat_model_dir), None, device="cpu", dtype=name
        )
        assert model.dtype == dtype and model.device == CPU and model.config._attn_implementation == "sdpa"
        config = EvalConfig(data=str(demo_subset["test"]), limit=4, max_new_tokens=2)
        losses[name] = evaluate_models(model, tokenizer, adapters, config)["results"][0]["loss"]
    assert abs(losses["bf16"] - losses["fp32"]) <= 1e-3 * losses["fp32"]  # measured 1.7e-5 relative
