"""LoRA layers and loading: errors that name what is wrong, dtypes, gradients, and offloaded (accelerate)
base models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import file_tensors, input_ids, logits, make_model, max_diff, perturb_adapter, quiet, seeded

from lorakit import AdapterFileError, LoraConfig, PeftModel, get_peft_model
from lorakit.layers import LoraEmbedding, LoraLayer, LoraLinear

GPT2 = {"fan_in_fan_out": True}


def _saved(tmp_path: Path, kind: str = "llama", **kwargs) -> tuple[Path, torch.Tensor]:
    """Save a trained adapter; returns the directory and its logits."""
    config = dict(r=4, target_modules=["q_proj", "v_proj"])
    config.update(kwargs)
    with seeded(0):
        model = get_peft_model(make_model(kind), LoraConfig(**config))
    perturb_adapter(model)
    model.save_pretrained(tmp_path)
    return tmp_path, logits(model.eval())


# ---- errors that help -----------------------------------------------------------------------------------

def test_target_matching_nothing_names_it_and_lists_modules() -> None:
    with pytest.raises(ValueError) as info:
        get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj", "qkv_proj"]))
    message = str(info.value)
    assert "'qkv_proj'" in message and "'q_proj'" not in message
    for available in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"):
        assert available in message
    with pytest.raises(ValueError, match=r"'\.\*nothing'.*c_attn"):
        get_peft_model(make_model("gpt2"), LoraConfig(target_modules=".*nothing"))


def test_failed_injection_leaves_the_model_untouched() -> None:
    model = make_model("llama")
    with pytest.raises(ValueError):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "qkv_proj"]))
    assert not [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_excluding_everything_is_an_error() -> None:
    with pytest.raises(ValueError, match="excluded"):
        get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))


def test_adapter_for_another_hidden_size_names_module_and_shapes(tmp_path: Path) -> None:
    with seeded(0):
        other = get_peft_model(make_model("llama", hidden=48), LoraConfig(r=4, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path)
    model = make_model("llama")
    with pytest.raises(AdapterFileError) as info:
        PeftModel.from_pretrained(model, tmp_path)
    message = str(info.value)
    assert "adapter_model.safetensors" in message
    assert "layers.0.self_attn.q_proj.lora_A" in message
    assert "(4, 48)" in message and "(4, 32)" in message
    assert not [m for m in model.modules() if isinstance(m, LoraLayer)], (
        "a failed load leaves no adapter layers"
    )


def test_failed_load_adapter_rolls_back(tmp_path: Path) -> None:
    with seeded(0):
        other = get_peft_model(
            make_model("llama", hidden=48), LoraConfig(r=4, target_modules=["k_proj", "q_proj"])
        )
    other.save_pretrained(tmp_path)
    model = get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(AdapterFileError, match="k_proj|q_proj"):
        model.load_adapter(tmp_path, "bad")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert [n for n, _ in model.named_parameters()] == names


def test_adapter_for_another_architecture(tmp_path: Path) -> None:
    _saved(tmp_path, "gpt2", target_modules=["c_attn"], **GPT2)
    with pytest.raises(AdapterFileError, match="c_attn"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 100, 0.5], ids=["empty", "5-bytes", "header-only", "half"])
def test_truncated_safetensors_is_an_adapter_file_error(tmp_path: Path, keep) -> None:
    _saved(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_missing_weights_file_is_an_adapter_file_error(tmp_path: Path) -> None:
    _saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)
    with pytest.raises(AdapterFileError, match="not found"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path / "nowhere")


def test_missing_tensor_in_file_is_reported(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    _saved(tmp_path)
    tensors = file_tensors(tmp_path)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match="missing 1 tensor"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


class _Payload:
    """Unpickling this object would create a file: the classic pickle code-execution gadget."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_bin_is_never_unpickled_unsafely(tmp_path: Path) -> None:
    _saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch.save({"base_model.model.x": _Payload(str(marker))}, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match=r"adapter_model\.bin.*refused"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)
    assert not marker.exists()


def test_plain_tensor_bin_loads(tmp_path: Path) -> None:
    directory, expected = _saved(tmp_path)
    tensors = file_tensors(directory)
    (directory / "adapter_model.safetensors").unlink()
    torch.save(tensors, directory / "adapter_model.bin")
    model = PeftModel.from_pretrained(make_model("llama"), directory)
    assert max_diff(logits(model), expected) <= 1e-6


def test_unsafe_adapter_names_are_refused() -> None:
    model = get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"]))
    for name in ("../x", "a/b", "", "..", "train", "eval", "to", "state_dict"):
        with pytest.raises(ValueError, match="adapter name"):
            model.add_adapter(name, LoraConfig(target_modules=["v_proj"]))


def test_cannot_adapt_unsupported_module() -> None:
    with pytest.raises(ValueError, match="cannot adapt a LlamaRMSNorm"):
        get_peft_model(make_model("llama"), LoraConfig(target_modules=["input_layernorm"]))


# ---- dtypes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        (
            "llama",
            dict(r=4, target_modules=["q_proj", "embed_tokens"], use_dora=True, modules_to_save=["lm_head"]),
        ),
        ("gpt2", dict(r=4, target_modules=["c_attn"], lora_bias=True, **GPT2)),
    ],
    ids=["llama", "gpt2"],
)
def test_adapter_dtype_over_low_precision_base(dtype: torch.dtype, kind: str, kwargs: dict) -> None:
    peft = pytest.importorskip("peft")
    for autocast in (True, False):
        ours = get_peft_model(
            make_model(kind, dtype=dtype), LoraConfig(**kwargs), autocast_adapter_dtype=autocast
        )
        with quiet():
            theirs = peft.get_peft_model(
                make_model(kind, dtype=dtype), peft.LoraConfig(**kwargs), autocast_adapter_dtype=autocast
            )
        ours_dtypes = {n: p.dtype for n, p in ours.named_parameters()}
        assert ours_dtypes == {n: p.dtype for n, p in theirs.named_parameters()}
        lora = {d for n, d in ours_dtypes.items() if "lora_" in n}
        assert lora == ({torch.float32} if autocast else {dtype})
        assert {d for n, d in ours_dtypes.items() if "lora_" not in n} == {dtype}
        out = ours(input_ids=input_ids()).logits
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_loading_into_low_precision_base_keeps_float32_adapters(tmp_path: Path) -> None:
    directory, expected = _saved(tmp_path, target_modules=["q_proj", "embed_tokens"], use_dora=True)
    model = PeftModel.from_pretrained(make_model("llama", dtype=torch.bfloat16), directory)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    reference = PeftModel.from_pretrained(make_model("llama", dtype=torch.bfloat16).float(), directory)
    assert max_diff(logits(model), logits(reference)) < 0.1


# ---- gradients ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        (
            "llama",
            dict(
                r=4,
                target_modules=["q_proj", "v_proj", "embed_tokens"],
                use_dora=True,
                modules_to_save=["lm_head"],
            ),
        ),
        ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], bias="lora_only", lora_bias=False, **GPT2)),
        ("mistral", dict(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.1)),
    ],
    ids=["llama-dora-embed-mts", "gpt2-bias", "mistral-all-linear"],
)
def test_only_adapter_parameters_train_and_base_gets_no_gradient(kind: str, kwargs: dict) -> None:
    model = get_peft_model(make_model(kind), LoraConfig(**kwargs))
    model.train()
    ids = input_ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name, param in model.named_parameters():
        if name in trainable:
            assert "lora_" in name or "modules_to_save" in name or name.endswith("base_layer.bias"), name
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    # One optimizer step changes the adapter only.
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)


# ---- offloaded base models (accelerate) --------------------------------------------------------------

OFFLOAD = {
    "llama": {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    },
    "gpt2": {
        "transformer.wte": "cpu",
        "transformer.wpe": "cpu",
        "transformer.h.0": "disk",
        "transformer.h.1": "cpu",
        "transformer.ln_f": "cpu",
        "lm_head": "cpu",
    },
}
OFFLOAD_CONFIGS = {
    "llama": dict(r=4, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "gpt2": dict(r=4, target_modules=["c_attn", "c_fc"], **GPT2),
}


def _offloaded(tmp_path: Path, kind: str):
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    if not base_dir.exists():
        make_model(kind).save_pretrained(base_dir)
    with quiet():
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, device_map=OFFLOAD[kind], offload_folder=tmp_path / "offload"
        )
    assert any(p.device.type == "meta" for p in model.parameters()), "some weights must be offloaded"
    return model.eval()


@pytest.mark.parametrize("init", [True, False, "gaussian"], ids=["default", "random", "gaussian"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_offloaded_layers_get_real_lora_weights_and_forward_works(tmp_path: Path, kind: str, init) -> None:
    ids = input_ids()
    config = dict(OFFLOAD_CONFIGS[kind], init_lora_weights=init)
    model = get_peft_model(_offloaded(tmp_path, kind), LoraConfig(**config)).eval()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    offloaded = [m for m in layers if m.weight.device.type == "meta"]
    assert offloaded, "the test needs LoRA layers over offloaded weights"
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.device == torch.device("cpu"), name
            assert torch.isfinite(param).all(), name
    if init is True:
        assert max_diff(logits(model, ids), logits(make_model(kind), ids)) == 0.0
    # The same adapter on a fully loaded model computes the same logits.
    perturb_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    reference = PeftModel.from_pretrained(make_model(kind), tmp_path / "adapter")
    assert max_diff(logits(model, ids), logits(reference, ids)) <= 1e-5
    # Loading an adapter onto an offloaded base works as well.
    loaded = PeftModel.from_pretrained(_offloaded(tmp_path, kind), tmp_path / "adapter")
    assert max_diff(logits(loaded, ids), logits(reference, ids)) <= 1e-5


@pytest.mark.parametrize(
    "kwargs",
    [{"use_dora": True}, {"init_lora_weights": "pissa"}, {"init_lora_weights": "olora"}],
    ids=["dora", "pissa", "olora"],
)
def test_offloaded_layers_refuse_methods_that_need_the_weight(tmp_path: Path, kwargs: dict) -> None:
    model = _offloaded(tmp_path, "llama")
    with pytest.raises(ValueError, match=r"model\.layers\.1\..*offloaded"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kwargs))
    assert not [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_merging_offloaded_layers_is_refused_clearly(tmp_path: Path) -> None:
    model = get_peft_model(_offloaded(tmp_path, "llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj.*offloaded"):
        model.merge_adapter()
    assert not any(layer.merged for layer in model.modules() if isinstance(layer, LoraLayer))


def test_layer_types_and_names() -> None:
    model = get_peft_model(make_model("gpt2"), LoraConfig(r=2, target_modules=["c_attn", "wte"], **GPT2))
    inner = model.get_base_model()
    assert (
        isinstance(inner.transformer.h[0].attn.c_attn, LoraLinear)
        and inner.transformer.h[0].attn.c_attn.fan_in_fan_out
    )
    assert isinstance(inner.transformer.wte, LoraEmbedding)
    names = dict(model.named_parameters())
    assert names["base_model.model.transformer.wte.lora_embedding_A.default"].shape == (2, 96)
    assert names["base_model.model.transformer.wte.lora_embedding_B.default"].shape == (32, 2)
    assert names["base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"].shape == (96, 2)
