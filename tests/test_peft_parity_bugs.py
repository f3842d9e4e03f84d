"""The behaviour differences from PEFT found by running PEFT's own test suite on lorakit (issue 24), each
checked against PEFT 0.21.2 doing the same."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorakit

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LIBS = {"peft": peft, "lorakit": lorakit}
X = torch.arange(30, dtype=torch.float32).view(3, 10) / 30


class Tower(nn.Module):
    """A module its parent calls with keyword arguments only, returning a tuple (like a vision tower)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(10, 10)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.proj(pixel_values)
        return hidden, hidden.sum(-1)


class Model(nn.Module):
    keywords = True  # how forward calls the tower

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tower = Tower()
        self.lin0 = nn.Linear(10, 20)
        self.blocks = nn.ModuleList([nn.Linear(20, 20) for _ in range(2)])
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.tower(pixel_values=x) if self.keywords else self.tower(x)
        hidden = self.lin0(hidden)
        for block in self.blocks:
            hidden = block(hidden)
        return self.lin1(hidden)


def make(lib, adapter_name: str = "default", **config):
    return lib.get_peft_model(Model(), lib.LoraConfig(**config), adapter_name=adapter_name)


def perturb(model: nn.Module) -> None:
    """Make every trainable copy differ from the base (modules_to_save copies start equal to it)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name or "lora_" in name:
                param.add_(torch.randn_like(param) * 0.1)


def transfer(ref: nn.Module, kit: nn.Module, adapter_name: str = "default") -> None:
    state = peft.get_peft_model_state_dict(ref, adapter_name=adapter_name)
    lorakit.set_peft_model_state_dict(kit, state, adapter_name=adapter_name)


def test_modules_to_save_called_with_keywords_only_and_mixed_batch_of_tuples():
    models = {
        name: make(lib, target_modules=["lin0"], modules_to_save=["tower"]) for name, lib in LIBS.items()
    }
    for name, lib in LIBS.items():
        models[name].add_adapter("other", lib.LoraConfig(target_modules=["lin0"], modules_to_save=["tower"]))
    perturb(models["peft"])
    for adapter in ("default", "other"):
        transfer(models["peft"], models["lorakit"], adapter)
    outputs = {name: model(X) for name, model in models.items()}
    torch.testing.assert_close(outputs["lorakit"], outputs["peft"], rtol=0, atol=1e-6)
    # A mixed batch through a modules_to_save module returning a tuple: each row as PEFT computes it with that
    # row's adapter set (PEFT itself refuses mixed batches through modules other than Linear/Embedding/Conv).
    rows = ["default", "__base__", "other"]
    expected = []
    for row, adapter in enumerate(rows):
        ref = models["peft"]
        if adapter == "__base__":
            with ref.disable_adapter():
                expected.append(ref(X)[row])
        else:
            ref.set_adapter(adapter)
            expected.append(ref(X)[row])
    models["lorakit"].eval()
    mixed = models["lorakit"](X, adapter_names=rows)
    torch.testing.assert_close(mixed, torch.stack(expected), rtol=0, atol=1e-6)


def test_regex_target_with_layers_to_transform_is_refused():
    for lib in LIBS.values():
        with pytest.raises(
            ValueError, match="`layers_to_transform` cannot be used when `target_modules` is a str"
        ):
            lib.LoraConfig(target_modules=r"blocks\.\d+", layers_to_transform=[0])


def test_add_weighted_adapter_and_modules_to_save():
    for lib in LIBS.values():
        model = make(lib, target_modules=["lin0"], modules_to_save=["lin1"])
        model.add_adapter("plain", lib.LoraConfig(target_modules=["lin0"]))
        model.add_weighted_adapter(["default", "plain"], [1.0, 1.0], "combined", combination_type="cat")
        assert "combined" in model.base_model.model.lin1.modules_to_save
        model.add_adapter("also_saves", lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
        with pytest.raises(ValueError, match="target the same module with modules_to_save"):
            model.add_weighted_adapter(["default", "also_saves"], [1.0, 1.0], "bad", combination_type="cat")


def test_add_weighted_adapter_cat_with_rank_patterns():
    models = {}
    for name, lib in LIBS.items():
        models[name] = make(
            lib,
            target_modules=["lin0", "lin1"],
            rank_pattern={"lin1": 2},
            alpha_pattern={"lin0": 4},
            init_lora_weights=False,
        )
        models[name].add_adapter("b", lib.LoraConfig(target_modules=["lin0"], r=4, init_lora_weights=False))
    for adapter in ("default", "b"):
        transfer(models["peft"], models["lorakit"], adapter)
    for model in models.values():
        model.add_weighted_adapter(["default", "b"], [0.7, 0.4], "cat", combination_type="cat")
        model.set_adapter("cat")
    torch.testing.assert_close(models["lorakit"](X), models["peft"](X), rtol=0, atol=1e-5)


def test_disable_adapter_freezes_the_adapter_inside_the_block():
    for name, lib in LIBS.items():
        model = make(lib, target_modules=["lin0"], modules_to_save=["lin1"])
        before = {n for n, p in model.named_parameters() if p.requires_grad}
        with model.disable_adapter():
            assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n), name
        assert {n for n, p in model.named_parameters() if p.requires_grad} == before, name


def test_config_without_peft_type(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "adapter_config.json").write_text(json.dumps({"foo": 1}))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["lin0"]}))
    for lib in LIBS.values():
        with pytest.raises(TypeError, match="missing required keys"):
            lib.LoraConfig.from_pretrained(tmp_path / "odd")
        assert lib.LoraConfig.from_pretrained(tmp_path / "plain").r == 4


@pytest.mark.parametrize("container", ["blocks"])
def test_modules_to_save_on_a_container_is_refused(container):
    for lib in LIBS.values():
        with pytest.raises(TypeError, match="cannot be applied to modules of type"):
            make(lib, target_modules=["lin0"], modules_to_save=[container])


@pytest.mark.parametrize("method", ["Gaussian", "OLoRA"])
def test_init_method_names_are_case_insensitive(method):
    factors = {}
    for name, lib in LIBS.items():
        torch.manual_seed(3)
        model = make(lib, target_modules=["lin0"], init_lora_weights=method)
        factors[name] = (
            peft.get_peft_model_state_dict(model)
            if name == "peft"
            else lorakit.get_peft_model_state_dict(model)
        )
    for key, value in factors["peft"].items():
        torch.testing.assert_close(factors["lorakit"][key], value, rtol=0, atol=1e-5)


def test_seeded_embedding_init_equals_peft():
    factors = {}
    for name, lib in LIBS.items():
        torch.manual_seed(0)
        base = nn.Sequential(nn.Embedding(50, 6))
        torch.manual_seed(1)
        model = lib.get_peft_model(base, lib.LoraConfig(target_modules=["0"]))
        factors[name] = lib.get_peft_model_state_dict(model)
    assert factors["lorakit"].keys() == factors["peft"].keys()
    for key, value in factors["peft"].items():
        assert torch.equal(factors["lorakit"][key], value), key
