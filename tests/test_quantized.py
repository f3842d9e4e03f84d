"""LoRA on bitsandbytes-quantized bases: 8-bit, 4-bit NF4, 4-bit FP4 and NF4 with double quantization.

A tiny random Llama (one layer, hidden 64: 4-bit blocks are 64 weights, bitsandbytes' CPU kernels tile
by 32) is saved once and reloaded through transformers with each BitsAndBytesConfig, on the CPU. One short
training run per kind teaches the adapter a cyclic token sequence, so its predictions on the probe batch
are decisive: argmax agreement then measures what merging does, not the near-ties of an untrained model.
PEFT 0.21.2 is the oracle for loading adapters on quantized bases.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, max_diff, perturb_adapter, quiet, seeded, tiny_llama
from torch import nn

import lorakit
from lorakit import quant
from lorakit.errors import MissingDependencyError
from lorakit.layers import LoraLinear

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"
)

HIDDEN = 64
KINDS = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
}
ALL_LINEAR = dict(r=8, lora_alpha=16, target_modules="all-linear")
STEPS = 12
LAYERS = 7  # linear layers of the one decoder layer


def _cycle_batch() -> torch.Tensor:
    """4 rows of a 12-token cycle at different offsets: each token determines the next one."""
    cycle = torch.randperm(VOCAB - 3, generator=torch.Generator().manual_seed(5))[:12] + 3
    return torch.stack([cycle[(torch.arange(16) + offset) % 12] for offset in (0, 3, 6, 9)])


PROBE = _cycle_batch()
RANDOM_IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(11))


def float_model() -> nn.Module:
    """The float32 model that every test loads quantized (seeded, so each call builds the same weights and
    leaves the global random state as it was)."""
    with seeded(0):
        return tiny_llama(hidden=HIDDEN, perturb=False, num_hidden_layers=1)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama-64")
    float_model().save_pretrained(directory)
    return directory


def load(base_dir: Path, kind: str, cpu_kernel: bool = True, **overrides) -> nn.Module:
    """The saved tiny model quantized as `kind`. `cpu_kernel=False` keeps bitsandbytes from repacking 4-bit
    weights for its AVX512-BF16 inference kernel (see `quant.restore_trainable_4bit_`)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with quiet():
        model = AutoModelForCausalLM.from_pretrained(
            base_dir,
            quantization_config=BitsAndBytesConfig(**{**KINDS[kind], **overrides}),
            dtype=torch.float32,
        )
    if not cpu_kernel:
        for module in model.modules():
            quant.restore_trainable_4bit_(module)
    return model.eval()


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor = PROBE) -> torch.Tensor:
    with quiet():
        return model(input_ids=ids).logits.float()


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the base model (quantized codes, scales and quant-state tensors included)."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if "lora_" not in k and torch.is_tensor(v)
    }


@dataclass
class Trained:
    kind: str
    adapter_dir: Path
    losses: list[float]
    base_before: dict[str, torch.Tensor]
    base_after: dict[str, torch.Tensor]
    lora_moved: dict[str, bool]
    logits: torch.Tensor  # the trained adapter model on PROBE (eval mode)
    base_logits: torch.Tensor  # its base (adapters disabled) on PROBE


@pytest.fixture(scope="module", params=list(KINDS))
def trained(
    request: pytest.FixtureRequest, base_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Trained:
    """A LoRA (all linear layers) trained for STEPS AdamW steps on PROBE, QLoRA style, and saved."""
    kind = request.param
    model = quant.prepare_for_kbit_training(load(base_dir, kind))
    with seeded(0):
        peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(**ALL_LINEAR))
    before = base_state(peft_model)
    start = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    peft_model.train()
    losses = []
    for _ in range(STEPS):
        with quiet():
            loss = peft_model(input_ids=PROBE, labels=PROBE).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    peft_model.eval()
    adapter_dir = tmp_path_factory.mktemp(f"adapter-{kind}")
    peft_model.save_pretrained(adapter_dir)
    moved = {n: not torch.equal(p, start[n]) for n, p in peft_model.named_parameters() if p.requires_grad}
    adapted = logits(peft_model)
    with peft_model.disable_adapter():
        base = logits(peft_model)
    return Trained(kind, adapter_dir, losses, before, base_state(peft_model), moved, adapted, base)


def reload(base_dir: Path, run: Trained) -> lorakit.PeftModel:
    """The trained adapter on a fresh base prepared as in training (so the base computes the same way)."""
    return lorakit.PeftModel.from_pretrained(
        quant.prepare_for_kbit_training(load(base_dir, run.kind)), run.adapter_dir
    )


def bnb_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]


# ---- wrapping, dtypes, training -----------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_lora_layers_wrap_bnb_layers_with_float32_adapters(base_dir: Path, kind: str) -> None:
    model = load(base_dir, kind)
    expected = logits(model, RANDOM_IDS)
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(**ALL_LINEAR))
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == LAYERS
    cls = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    assert all(isinstance(layer.base_layer, cls) for layer in layers)
    assert all(p.dtype == torch.float32 for layer in layers for p in layer.adapter_parameters("default"))
    assert all(layer.lora_A["default"].weight.shape == (8, layer.in_features) for layer in layers)
    # B = 0 at init: the adapter adds exact zeros, so the output is the quantized base's.
    assert torch.equal(logits(peft_model, RANDOM_IDS), expected)
    trainable, total = peft_model.get_nb_trainable_parameters()
    theirs = peft.get_peft_model(load(base_dir, kind), peft.LoraConfig(**ALL_LINEAR))
    assert (trainable, total) == theirs.get_nb_trainable_parameters()


def test_adapter_dtype_follows_4bit_compute_dtype_without_autocast(base_dir: Path) -> None:
    model = load(base_dir, "nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    peft_model = lorakit.get_peft_model(
        model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]), autocast_adapter_dtype=False
    )
    assert (
        peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype
        == torch.bfloat16
    )
    assert torch.isfinite(logits(peft_model, RANDOM_IDS)).all()
    int8 = lorakit.get_peft_model(load(base_dir, "int8"), lorakit.LoraConfig(r=4, target_modules=["q_proj"]),
                                  autocast_adapter_dtype=False)
    assert (
        int8.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    )


def test_training_updates_only_lora_weights_and_reduces_the_loss(trained: Trained) -> None:
    assert trained.losses[-1] < trained.losses[0] - 0.5, trained.losses
    assert all(trained.lora_moved.values()) and all("lora_" in n for n in trained.lora_moved)
    assert trained.base_before.keys() == trained.base_after.keys()
    assert all(torch.equal(trained.base_before[k], trained.base_after[k]) for k in trained.base_before)
    assert agreement(trained.logits, trained.base_logits) < 0.5, "the adapter must change the predictions"


def test_4bit_gradients_survive_a_cpu_inference_pass(base_dir: Path) -> None:
    """On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights on the first no-grad eval forward, after which
    its kernel passes no gradient to the layer input; prepare_for_kbit_training undoes that."""
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    grads = []
    for inference_first in (False, True):
        model = load(base_dir, "nf4")
        if inference_first:
            logits(model, RANDOM_IDS)
        with seeded(0):
            peft_model = lorakit.get_peft_model(quant.prepare_for_kbit_training(model), config)
        peft_model.train()
        peft_model(input_ids=PROBE, labels=PROBE).loss.backward()
        # The query reaches the loss only through base layers (o_proj and the MLP after it).
        grads.append(peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad)
    assert grads[1] is not None and grads[1].abs().sum() > 0
    # Equal up to the bfloat16 rounding of the block scales that the repacking did.
    assert (grads[1] - grads[0]).norm() <= 0.05 * grads[0].norm()


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq"])
def test_dequantize_reads_cpu_packed_4bit_weights(base_dir: Path, kind: str) -> None:
    model = load(base_dir, kind)
    layer = model.model.layers[0].mlp.down_proj
    before = quant.dequantize_weight(layer)
    logits(model, RANDOM_IDS)  # may repack the weight for bitsandbytes' CPU kernel
    after = quant.dequantize_weight(layer)
    assert after.shape == (HIDDEN, 2 * HIDDEN)
    # Only the block scales may have been rounded to bfloat16 (8 significant bits).
    assert max_diff(after, before) <= 2 ** -8 * before.abs().max()


# ---- saving and loading, and PEFT --------------------------------------------------------------


def test_save_load_round_trip(base_dir: Path, trained: Trained) -> None:
    assert max_diff(logits(reload(base_dir, trained)), trained.logits) <= 1e-5


def test_peft_loads_the_lorakit_adapter(base_dir: Path, trained: Trained) -> None:
    ours = lorakit.PeftModel.from_pretrained(load(base_dir, trained.kind), trained.adapter_dir)
    with quiet():
        theirs = peft.PeftModel.from_pretrained(load(base_dir, trained.kind), trained.adapter_dir)
    expected = logits(ours)
    assert agreement(expected, trained.base_logits) < 0.5
    assert max_diff(logits(theirs), expected) <= 1e-4
    assert max_diff(logits(theirs, RANDOM_IDS), logits(ours, RANDOM_IDS)) <= 1e-4


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("kwargs", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
], ids=["lora", "dora"])
def test_lorakit_loads_a_peft_adapter(tmp_path: Path, base_dir: Path, kind: str, kwargs: dict) -> None:
    # Without bitsandbytes' CPU repacking: PEFT's DoRA reads a repacked 4-bit weight as if it were not
    # (test_dora_uses_the_dequantized_weight checks lorakit's DoRA on the repacked path).
    with seeded(1), quiet():
        theirs = peft.get_peft_model(load(base_dir, kind, cpu_kernel=False), peft.LoraConfig(**kwargs))
    perturb_adapter(theirs, scale=0.05)
    theirs.eval()
    expected = logits(theirs, RANDOM_IDS)
    with quiet():
        theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(load(base_dir, kind, cpu_kernel=False), tmp_path)
    assert max_diff(logits(ours, RANDOM_IDS), expected) <= 1e-4
    # The other way round on the same base: lorakit's save of the same adapter loads in PEFT.
    ours.save_pretrained(tmp_path / "lorakit")
    with quiet():
        again = peft.PeftModel.from_pretrained(load(base_dir, kind, cpu_kernel=False), tmp_path / "lorakit")
    assert max_diff(logits(again, RANDOM_IDS), expected) <= 1e-4


# ---- merging --------------------------------------------------------------------------------------


def test_merge_and_unload_dequantizes_by_default(tmp_path: Path, base_dir: Path, trained: Trained) -> None:
    from transformers import AutoModelForCausalLM

    peft_model = reload(base_dir, trained)
    with pytest.warns(UserWarning, match="requantize=True"):
        merged = peft_model.merge_and_unload()
    assert not bnb_layers(merged) and not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert not getattr(merged, "is_quantized", False) and "quantization_config" not in merged.config.to_dict()
    merged_logits = logits(merged)
    assert agreement(merged_logits, trained.logits) >= 0.9
    if trained.kind != "int8":  # 4-bit layers compute in float32 here: the merge adds only float32 rounding
        assert max_diff(merged_logits, trained.logits) <= 1e-4
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert max_diff(logits(reloaded), merged_logits) <= 1e-5


def test_merge_and_unload_can_requantize(base_dir: Path, trained: Trained) -> None:
    peft_model = reload(base_dir, trained)
    with pytest.warns(UserWarning, match="quantized again"):
        merged = peft_model.merge_and_unload(requantize=True)
    assert len(bnb_layers(merged)) == LAYERS and getattr(merged, "is_quantized", False)
    assert agreement(logits(merged), trained.logits) >= 0.9


def test_merge_unmerge_in_place_requantizes(base_dir: Path, trained: Trained) -> None:
    peft_model = reload(base_dir, trained)
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    original = [layer.base_weight().clone() for layer in layers]
    exact = [w + layer.delta_weight("default") for w, layer in zip(original, layers)]
    peft_model.merge_adapter()
    assert agreement(logits(peft_model), trained.logits) >= 0.9
    # Each write rounds into the layer's format once: one quantization error of the merged weight (relative
    # Frobenius error of row-wise int8 about 0.006, of block-wise NF4/FP4 about 0.1) for the merge, two
    # after unmerging.
    error = 0.01 if trained.kind == "int8" else 0.15
    for layer, expected in zip(layers, exact):
        assert (layer.base_weight() - expected).norm() <= error * expected.norm(), layer.module_name
    peft_model.unmerge_adapter()
    for layer, before, expected in zip(layers, original, exact):
        assert (layer.base_weight() - before).norm() <= 2 * error * expected.norm(), layer.module_name
    assert agreement(logits(peft_model), trained.logits) >= 0.9


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_dora_uses_the_dequantized_weight(tmp_path: Path, base_dir: Path, kind: str) -> None:
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True
    )
    peft_model = lorakit.get_peft_model(load(base_dir, kind), config)
    layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
    norms = quant.dequantize_weight(layer.base_layer).norm(dim=1)
    assert torch.allclose(layer.lora_magnitude_vector["default"].weight, norms, rtol=1e-6)
    perturb_adapter(peft_model, scale=0.05)
    peft_model.eval()
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    # The same adapter on the dequantized float base: equal up to the quantized matmul's own rounding (for
    # 4-bit on AVX512-BF16 CPUs, bitsandbytes' repacked bfloat16 kernel), so the norms were the right ones.
    reference = lorakit.PeftModel.from_pretrained(quant.dequantize_model(load(base_dir, kind)), tmp_path)
    assert max_diff(logits(reference), expected) <= 1e-2
    merged = peft_model.merge_and_unload()
    assert agreement(logits(merged), expected) >= 0.9


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("method", ["olora", "pissa"])
def test_olora_pissa_residual_error_is_a_quantization_error(base_dir: Path, kind: str, method: str) -> None:
    """The init runs on the dequantized weight W and stores the residual R = W − s·BA quantized, so the
    layer's effective weight Q(R) + s·BA differs from W by R's quantization error: no more than what
    quantizing the original float32 weight costs."""
    full = float_model()
    model = load(base_dir, kind)
    names = ["q_proj", "v_proj"]
    before = {n: quant.dequantize_weight(getattr(model.model.layers[0].self_attn, n)) for n in names}
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=4, lora_alpha=4, target_modules=names,
                                                                  init_lora_weights=method))
    for name in names:
        layer = getattr(peft_model.base_model.model.model.layers[0].self_attn, name)
        assert quant.is_quantized(layer.base_layer)
        effective = layer.base_weight() + layer.delta_weight("default")
        original = getattr(full.model.layers[0].self_attn, name).weight.detach()
        quantization_error = (before[name] - original).norm()
        assert quantization_error > 0
        assert (effective - before[name]).norm() <= 1.5 * quantization_error, name


def test_dequantize_model_keeps_the_outputs(base_dir: Path) -> None:
    model = load(base_dir, "nf4")
    quant.prepare_for_kbit_training(model)  # CPU kernel off: the 4-bit layers compute exactly in float32
    expected = logits(model, RANDOM_IDS)
    quant.dequantize_model(model)
    assert not bnb_layers(model) and not quant.has_quantized_layers(model)
    assert max_diff(logits(model, RANDOM_IDS), expected) <= 1e-5


# ---- configuration, preparation, missing bitsandbytes ------------------------------------------


def test_quantization_config() -> None:
    config = quant.quantization_config(load_in_4bit=True)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float32  # the CPU default
    fp4 = quant.quantization_config(
        load_in_4bit=True, quant_type="fp4", double_quant=False, compute_dtype=torch.bfloat16
    )
    assert fp4.bnb_4bit_quant_type == "fp4" and not fp4.bnb_4bit_use_double_quant
    assert fp4.bnb_4bit_compute_dtype == torch.bfloat16
    assert quant.quantization_config(load_in_8bit=True).load_in_8bit
    with pytest.raises(ValueError, match="exactly one"):
        quant.quantization_config(load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(ValueError, match="quant_type"):
        quant.quantization_config(load_in_4bit=True, quant_type="int4")


def test_prepare_for_kbit_training(base_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    with quiet():
        model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant.quantization_config(
            load_in_4bit=True), dtype=torch.bfloat16)
    packed = {n: p.dtype for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' renamed checkpointing call: no warning
        assert quant.prepare_for_kbit_training(model, gradient_checkpointing=True) is model
    assert all(p.dtype == torch.uint8 for n, p in model.named_parameters() if n in packed)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n not in packed)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    peft_model(input_ids=PROBE, labels=PROBE).loss.backward()
    # B = 0 at init, so A's gradient is zero; B's reaches layer 0 through the checkpointed layers.
    b = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert b.grad is not None and b.grad.abs().sum() > 0


def test_peft_named_prepare_turns_checkpointing_on_by_default(base_dir: Path) -> None:
    """`from lorakit import prepare_model_for_kbit_training` is PEFT's function: same name, same default."""
    from transformers import AutoModelForCausalLM

    with quiet():
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=quant.quantization_config(load_in_8bit=True)
        )
    assert lorakit.prepare_model_for_kbit_training(model) is model
    assert model.is_gradient_checkpointing and not any(p.requires_grad for p in model.parameters())


def test_missing_bitsandbytes_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(MissingDependencyError) as error:
        quant.quantization_config(load_in_4bit=True)
    message = str(error.value)
    assert "bitsandbytes" in message and "pip install" in message and "bitsandbytes>=0.49" in message
    assert "\n" not in message


def test_bitsandbytes_too_old_or_not_running_is_a_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.quant import config

    monkeypatch.setattr(bnb, "__version__", "0.42.0")
    with pytest.raises(MissingDependencyError, match=r"0\.42\.0 is too old .*pip install"):
        quant.require_bitsandbytes()
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device\nlong traceback text")

    monkeypatch.setattr(config, "_WORKS_ON", set())
    monkeypatch.setattr(bnb.functional, "quantize_4bit", broken)
    with pytest.raises(MissingDependencyError) as error:
        quant.quantization_config(load_in_8bit=True)
    assert "cannot run on cpu (no kernel for this device)" in str(error.value)
    assert "\n" not in str(error.value)
