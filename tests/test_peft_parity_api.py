"""PEFT-parity of the model-level API that code written for PEFT uses (issue 24), PEFT 0.21.2 as the oracle.

Each test runs the same calls on PEFT and on lorakit over the same small model built in code and compares
what comes back: dtypes, names, state dicts, outputs, load results, warnings, error types, model cards.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import yaml
from torch import nn

import lorakit

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LIBS = {"peft": peft, "lorakit": lorakit}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.relu(self.lin0(x)))


X = torch.arange(30, dtype=torch.float32).view(3, 10) / 30


def both(config: dict, adapter_name: str = "default", **kwargs) -> dict:
    """The same fresh MLP wrapped by each library with the same config."""
    return {
        name: lib.get_peft_model(MLP(), lib.LoraConfig(**config), adapter_name=adapter_name, **kwargs)
        for name, lib in LIBS.items()
    }


def copy_weights(models: dict, adapter_name: str = "default") -> None:
    """Give lorakit's adapter PEFT's (random) weights, through the state-dict functions of both."""
    state = peft.get_peft_model_state_dict(models["peft"], adapter_name=adapter_name)
    result = lorakit.set_peft_model_state_dict(models["lorakit"], state, adapter_name=adapter_name)
    assert result.unexpected_keys == [] and result.missing_keys == []


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_everywhere(tmp_path, autocast):
    dtypes = {}
    for name, lib in LIBS.items():
        model = lib.get_peft_model(
            MLP().to(torch.bfloat16), lib.LoraConfig(target_modules=["lin0"]), autocast_adapter_dtype=autocast
        )
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin1"]), autocast_adapter_dtype=autocast)
        model.save_pretrained(tmp_path / name)
        loaded = lib.PeftModel.from_pretrained(
            MLP().to(torch.bfloat16), tmp_path / name, autocast_adapter_dtype=autocast
        )
        loaded.load_adapter(tmp_path / name / "other", "other", autocast_adapter_dtype=autocast)
        dtypes[name] = {n: p.dtype for m in (model, loaded) for n, p in m.named_parameters() if m.prefix in n}
    assert dtypes["lorakit"] == dtypes["peft"]
    assert set(dtypes["peft"].values()) == {torch.float32 if autocast else torch.bfloat16}


def test_prefix_and_base_model_attributes():
    models = both({"target_modules": ["lin0", "lin1"], "modules_to_save": None})
    for model in models.values():
        model.add_adapter("other", type(model.peft_config["default"])(target_modules=["lin1"]))
    kit, ref = models["lorakit"], models["peft"]
    assert kit.prefix == ref.prefix
    assert [n for n, _ in kit.named_parameters() if kit.prefix in n] == [
        n for n, _ in ref.named_parameters() if ref.prefix in n
    ]
    assert sorted(kit.base_model.peft_config) == sorted(ref.base_model.peft_config)
    assert kit.base_model.targeted_module_names == ref.base_model.targeted_module_names
    for model in models.values():
        model.base_model.set_adapter(["default", "other"])
    assert kit.active_adapters == ref.active_adapters == ["default", "other"]
    assert kit.base_model.active_adapter == ref.base_model.active_adapter
    # attribute forwarding: `.model` and the named submodules, through the wrapper and its base_model
    assert kit.model is kit.base_model.model and kit.lin0 is kit.base_model.lin0 is kit.model.lin0
    assert type(ref.lin0).__name__ == type(kit.lin0).__name__.removeprefix("Lora")


def test_several_active_adapters_sum_their_updates():
    models = both({"target_modules": ["lin0"], "init_lora_weights": False})
    for model in models.values():
        model.add_adapter(
            "other",
            type(model.peft_config["default"])(target_modules=["lin0", "lin1"], init_lora_weights=False),
        )
    copy_weights(models)
    copy_weights(models, "other")
    outputs = {}
    for name, model in models.items():
        model.base_model.set_adapter(["default", "other"])
        outputs[name] = model(X)
    torch.testing.assert_close(outputs["lorakit"], outputs["peft"], rtol=0, atol=1e-6)
    with torch.no_grad():
        single = models["lorakit"](X)
    models["lorakit"].set_adapter("default")
    assert not torch.allclose(single, models["lorakit"](X))


def test_state_dict_functions_and_load_result():
    models = both({"target_modules": ["lin0"], "modules_to_save": ["lin1"], "use_dora": True})
    kit_state = lorakit.get_peft_model_state_dict(models["lorakit"])
    ref_state = peft.get_peft_model_state_dict(models["peft"])
    assert {k: v.shape for k, v in kit_state.items()} == {k: v.shape for k, v in ref_state.items()}
    partial = {k: v for k, v in ref_state.items() if "lora_B" not in k}
    partial["base_model.model.nowhere.lora_A.weight"] = torch.zeros(1)
    results = {
        "lorakit": lorakit.set_peft_model_state_dict(models["lorakit"], partial),
        "peft": peft.set_peft_model_state_dict(models["peft"], partial),
    }
    assert results["lorakit"].unexpected_keys == results["peft"].unexpected_keys
    assert [k for k in results["peft"].missing_keys if "lora_" in k] == results["lorakit"].missing_keys
    bad = dict(ref_state, **{"base_model.model.lin0.lora_A.weight": torch.zeros(3, 3)})
    for name, lib in LIBS.items():
        with pytest.raises(RuntimeError, match="size mismatch"):
            lib.set_peft_model_state_dict(models[name], bad)


def test_load_adapter_returns_load_result(tmp_path):
    for name, lib in LIBS.items():
        model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"]))
        model.save_pretrained(tmp_path / name)
        result = model.load_adapter(tmp_path / name, adapter_name="other")
        assert (result.missing_keys, result.unexpected_keys) == ([], []), name


def test_inject_adapter_in_model_matches_peft():
    models = {
        name: lib.inject_adapter_in_model(
            lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False), MLP()
        )
        for name, lib in LIBS.items()
    }
    assert [n for n, _ in models["lorakit"].named_parameters()] == [
        n for n, _ in models["peft"].named_parameters()
    ]
    state = peft.get_peft_model_state_dict(models["peft"])
    assert set(lorakit.get_peft_model_state_dict(models["lorakit"])) == set(state)
    lorakit.set_peft_model_state_dict(models["lorakit"], state)
    torch.testing.assert_close(models["lorakit"](X), models["peft"](X), rtol=0, atol=1e-6)


def test_disable_adapter_layers_and_context():
    models = both({"target_modules": ["lin0"], "init_lora_weights": False})
    copy_weights(models)
    for name, model in models.items():
        model.disable_adapter_layers()
        torch.testing.assert_close(model(X), MLP()(X))
        assert all(not p.requires_grad for n, p in model.named_parameters() if model.prefix in n)
        model.enable_adapter_layers()
        with model.disable_adapter():
            with model.disable_adapter():
                assert not model.has_active_enabled_adapter
            assert not model.has_active_enabled_adapter, name
            trainable = [n for n, p in model.named_parameters() if p.requires_grad]
            assert trainable == [], name
        assert model.has_active_enabled_adapter
        assert any(p.requires_grad for p in model.parameters())


def test_warnings_and_error_classes(tmp_path):
    assert issubclass(lorakit.PeftWarning, UserWarning) and issubclass(peft.PeftWarning, UserWarning)
    assert issubclass(lorakit.PeftError, Exception)
    for model in both({"target_modules": ["lin0"]}).values():
        model.merge_adapter()
        with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
            model.merge_adapter()
        with pytest.raises(
            ValueError, match=re.escape("Cannot delete adapter(s) ['default'] while they are merged")
        ):
            model.delete_adapter("default")
    # an adapter whose shapes do not fit the base: RuntimeError in both
    for name, lib in LIBS.items():
        model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"]))
        model.save_pretrained(tmp_path / name)
        wider = MLP()
        wider.lin0, wider.lin1 = nn.Linear(10, 30), nn.Linear(30, 2)
        with pytest.raises(RuntimeError, match="lin0"):
            lib.PeftModel.from_pretrained(wider, tmp_path / name)
    with pytest.raises(ValueError):
        lorakit.PeftModel.from_pretrained(MLP(), tmp_path / "missing")


class Embedded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(20, 10)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.embed_tokens(ids))


NOT_EXCLUDED = "but no modules were excluded"
EMBEDDINGS_SAVED = "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`"
WARNINGS = [  # (case, config, save?, text, warned?)
    ("exclude_modules excluding nothing", {"target_modules": ["lin0"], "exclude_modules": ["lin9"]}, False,
     NOT_EXCLUDED, True),
    ("exclude_modules excluding a module", {"target_modules": ["lin0", "embed_tokens"],
                                            "exclude_modules": ["embed_tokens"]}, False, NOT_EXCLUDED, False),
    ("embed_tokens targeted, saved with 'auto'", {"target_modules": ["embed_tokens", "lin0"]}, True,
     EMBEDDINGS_SAVED, True),
    ("no embedding targeted, saved with 'auto'", {"target_modules": ["lin0"]}, True, EMBEDDINGS_SAVED, False),
]


@pytest.mark.parametrize(("config", "save", "text", "warned"), [c[1:] for c in WARNINGS],
                         ids=[c[0] for c in WARNINGS])
def test_warnings_peft_users_rely_on(tmp_path, config, save, text, warned):
    for name, lib in LIBS.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = lib.get_peft_model(Embedded(), lib.LoraConfig(**config))
            if save:
                model.save_pretrained(tmp_path / name)
        messages = [str(w.message) for w in caught]
        assert any(text in m for m in messages) is warned, (name, messages)


def test_from_pretrained_keeps_the_config_object_and_training_mode_refuses_adapter_names(tmp_path):
    for name, lib in LIBS.items():
        lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"])).save_pretrained(tmp_path / name)
        config = lib.LoraConfig(target_modules=["lin0"])
        model = lib.PeftModel.from_pretrained(MLP(), tmp_path / name, config=config, is_trainable=True)
        assert model.peft_config["default"] is config and config.inference_mode is False, name
        model.train()
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training"):
            model(X, adapter_names=["default"] * 3)


def _card(directory) -> dict:
    text = (directory / "README.md").read_text()
    return yaml.safe_load(re.search(r"---\n(.*?)\n---", text, re.DOTALL).group(1))


def test_model_card_written_and_merged(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cards = {}
    for name, lib in LIBS.items():
        base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16))
        base.config._name_or_path = "tiny/gpt2"
        model = lib.get_peft_model(base, lib.LoraConfig(target_modules=["c_attn"]))
        (tmp_path / name).mkdir()
        (tmp_path / name / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n# My adapter\n")
        model.save_pretrained(tmp_path / name)
        cards[name] = _card(tmp_path / name)
        assert "# My adapter" in (tmp_path / name / "README.md").read_text()
        model.save_pretrained(tmp_path / f"{name}-fresh")
        assert _card(tmp_path / f"{name}-fresh")["library_name"] == "peft"
    for key in ("library_name", "base_model", "license"):
        assert cards["lorakit"][key] == cards["peft"][key]
    # (PEFT also writes an empty "base_model:adapter:" tag, from the wrapper's own empty name)
    assert {t for t in cards["peft"]["tags"] if not t.endswith(":")} <= set(cards["lorakit"]["tags"])
    assert {"mine", "lora"} <= set(cards["lorakit"]["tags"])
    custom = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"]))
    custom.save_pretrained(tmp_path / "custom")
    assert "base_model" not in _card(tmp_path / "custom")


def test_push_to_hub_says_what_is_missing():
    model = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(NotImplementedError, match="push_to_hub.*save_pretrained"):
        model.push_to_hub("me/adapter")


def test_config_flags_and_peft_type():
    for lib in LIBS.values():
        config = lib.LoraConfig(target_modules=["lin0"])
        assert config.peft_type.value == "LORA" and config.peft_type == "LORA"
        assert not config.is_prompt_learning and not config.is_adaption_prompt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copy.deepcopy(lorakit.LoraConfig(target_modules=["lin0"]))


def test_base_model_state_dict_functions():
    models = both({"target_modules": ["lin0"], "modules_to_save": ["lin1"]})
    kit = lorakit.get_base_model_state_dict(models["lorakit"])
    ref = peft.utils.get_base_model_state_dict(models["peft"])
    assert (
        {k: v.shape for k, v in kit.items()}
        == {k: v.shape for k, v in ref.items()}
        == {k: v.shape for k, v in MLP().state_dict().items()}
    )
    fresh = {k: v + 1 for k, v in MLP().state_dict().items()}
    result = lorakit.set_base_model_state_dict(
        models["lorakit"], dict(fresh, extra=torch.zeros(1)), strict=False
    )
    assert (result.missing_keys, result.unexpected_keys) == ([], ["extra"])
    torch.testing.assert_close(lorakit.get_base_model_state_dict(models["lorakit"]), fresh)


def test_inject_with_low_cpu_mem_usage_then_load():
    ref = peft.get_peft_model(
        MLP(), peft.LoraConfig(target_modules=["lin0"], init_lora_weights=False, use_dora=True)
    )
    state = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(ref).items()}
    for lib in LIBS.values():
        model = lib.inject_adapter_in_model(
            lib.LoraConfig(target_modules=["lin0"], use_dora=True), MLP(), low_cpu_mem_usage=True
        )
        assert "meta" in {p.device.type for p in model.parameters()}
        lib.set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
        torch.testing.assert_close(model(X), ref(X), rtol=0, atol=1e-6)


def test_state_dict_with_trained_biases_loads_into_a_config_without():
    config = {"target_modules": ["lin0"], "init_lora_weights": False, "bias": "all"}
    models = both(config)
    with torch.no_grad():
        models["peft"].base_model.model.lin1.bias.fill_(1.23)
    state = peft.get_peft_model_state_dict(models["peft"])
    outputs = {}
    for name, lib in LIBS.items():
        fresh = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"]))
        lib.set_peft_model_state_dict(fresh, state)
        outputs[name] = fresh(X)
    torch.testing.assert_close(outputs["lorakit"], outputs["peft"], rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs["peft"], models["peft"](X), rtol=0, atol=1e-6)


def test_mixed_batch_errors_as_peft():
    models = both({"target_modules": ["lin0"]})
    for model in models.values():
        model.eval()
        with pytest.raises(
            ValueError, match="Length of `adapter_names` should be the same as the number of inputs"
        ):
            model(X, adapter_names=["default"])
        model.merge_adapter()
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
            model(X, adapter_names=["default"] * 3)


def test_tuner_layer_api():
    models = both({"target_modules": ["lin0"], "init_lora_weights": False, "modules_to_save": ["lin1"]})
    copy_weights(models)
    layers = {name: model.base_model.model.lin0 for name, model in models.items()}
    kit, ref = layers["lorakit"], layers["peft"]
    torch.testing.assert_close(
        kit.get_delta_weight("default"), ref.get_delta_weight("default"), rtol=0, atol=1e-7
    )
    assert kit.get_base_layer() is kit.base_layer and kit.active_adapters == ref.active_adapters
    for name, layer in layers.items():
        assert not layer.disable_adapters
        layer.enable_adapters(False)
        assert layer.disable_adapters, name
        torch.testing.assert_close(models[name](X), MLP()(X))
        layer.enable_adapters(True)
    for model in models.values():
        model.add_adapter(
            "other", type(model.peft_config["default"])(target_modules=["lin0"], init_lora_weights=False)
        )
    copy_weights(models, "other")
    outputs = {}
    for name, model in models.items():
        for module in model.modules():
            if (
                hasattr(module, "set_adapter")
                and module is not model
                and module is not model.base_model
                and hasattr(module, "base_layer")
            ):
                module.set_adapter(["default", "other"])
        outputs[name] = model(X)
    torch.testing.assert_close(outputs["lorakit"], outputs["peft"], rtol=0, atol=1e-6)
    assert layers["lorakit"].active_adapters == layers["peft"].active_adapters == ["default", "other"]
    emb = {
        name: lib.get_peft_model(nn.Sequential(nn.Embedding(7, 3)), lib.LoraConfig(target_modules=["0"]))
        for name, lib in LIBS.items()
    }
    assert (
        emb["lorakit"].base_model.model[0].in_features,
        emb["lorakit"].base_model.model[0].out_features,
    ) == (emb["peft"].base_model.model[0].in_features, emb["peft"].base_model.model[0].out_features)
