"""LoRA on nn.Conv1d / Conv2d / Conv3d against PEFT 0.21.2: seeded init, outputs, merging, files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LIBS = {"peft": peft, "lorakit": lorakit}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Net(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = CONV[dim](3, 6, 3, stride=2, padding=1)
        self.head = CONV[dim](6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x))).flatten(1)


def inputs(dim: int) -> torch.Tensor:
    torch.manual_seed(5)
    return torch.rand((2, 3) + (6,) * dim)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("init", [True, "gaussian"])
def test_seeded_init_equals_peft(dim, init):
    states = {}
    for name, lib in LIBS.items():
        torch.manual_seed(1)
        model = lib.get_peft_model(
            Net(dim), lib.LoraConfig(target_modules=["conv", "head"], init_lora_weights=init)
        )
        states[name] = lib.get_peft_model_state_dict(model)
    assert states["lorakit"].keys() == states["peft"].keys()
    for key, value in states["peft"].items():
        assert torch.equal(states["lorakit"][key], value), key


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_outputs_merge_and_files_match_peft(dim, use_dora, tmp_path):
    x = inputs(dim)
    config = {"target_modules": ["conv", "head"], "lora_alpha": 16, "lora_dropout": 0.0, "use_dora": use_dora}
    ref = peft.get_peft_model(Net(dim), peft.LoraConfig(init_lora_weights=False, **config))
    ref.save_pretrained(tmp_path)
    kit = lorakit.PeftModel.from_pretrained(Net(dim), tmp_path)
    expected = ref(x)
    torch.testing.assert_close(kit(x), expected, rtol=0, atol=1e-6)
    if dim < 3:  # PEFT 0.21 cannot merge a 1×1×1 Conv3d (its squeeze assumes 2-D kernels)
        ref.merge_adapter()
        torch.testing.assert_close(
            kit.get_base_model().conv.get_delta_weight("default"),
            ref.base_model.model.conv.get_delta_weight("default"),
            rtol=0,
            atol=1e-6,
        )
    merged = kit.merge_and_unload()
    assert not any(isinstance(m, lorakit.layers.LoraLayer) for m in merged.modules())
    torch.testing.assert_close(merged(x), expected, rtol=0, atol=1e-5)
    again = lorakit.get_peft_model(Net(dim), lorakit.LoraConfig(init_lora_weights=False, **config))
    again.save_pretrained(tmp_path / "kit")
    loaded = peft.PeftModel.from_pretrained(Net(dim), tmp_path / "kit")
    torch.testing.assert_close(loaded(x), again(x), rtol=0, atol=1e-6)


def test_training_updates_only_the_adapter_and_mixed_rows():
    x = inputs(2)
    model = lorakit.get_peft_model(
        Net(2), lorakit.LoraConfig(target_modules=["conv"], init_lora_weights=False)
    )
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["conv"], init_lora_weights=False))
    model.eval()
    rows = model(x, adapter_names=["other", "__base__"])
    model.set_adapter("other")
    torch.testing.assert_close(rows[0], model(x)[0])
    with model.disable_adapter():
        torch.testing.assert_close(rows[1], model(x)[1])
    model.train()
    model(x).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"base_model.model.conv.lora_A.other.weight", "base_model.model.conv.lora_B.other.weight"}


class Grouped(nn.Module):
    def __init__(self, kernel: int = 3, groups: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 8, kernel, padding=1, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(1)


# (2, 4): A's kernel holds as many positions as there are groups, so A and a grouped B look alike by size.
@pytest.mark.parametrize(("kernel", "groups"), [(3, 2), (2, 4)])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_grouped_convolutions_as_peft_seeded_init_outputs_files_and_refusals(
    tmp_path, use_dora, kernel, groups
):
    torch.manual_seed(5)
    x = torch.rand(2, 4, 5, 5)
    models, outputs = {}, {}
    for name, lib in LIBS.items():
        torch.manual_seed(1)
        with pytest.warns(UserWarning, match="groups > 1. Merging is not supported"):
            config = lib.LoraConfig(target_modules=["conv"], r=4, use_dora=use_dora)
            models[name] = lib.get_peft_model(Grouped(kernel, groups), config)
        with torch.no_grad():  # B starts at zero: give it values (the same in both) so the update shows
            torch.manual_seed(2)
            models[name].base_model.model.conv.lora_B["default"].weight.normal_()
        outputs[name] = models[name](x)
        with pytest.raises(NotImplementedError, match="Merging is not supported for _ConvNd layers"):
            models[name].merge_adapter()
        with pytest.raises(ValueError, match="the rank is divisible by groups"):
            lib.get_peft_model(Grouped(kernel, groups), lib.LoraConfig(target_modules=["conv"], r=3))
    assert models["lorakit"].base_model.model.conv.lora_B["default"].weight.shape == (8, 4 // groups, 1, 1)
    for key, value in peft.get_peft_model_state_dict(models["peft"]).items():
        assert torch.equal(lorakit.get_peft_model_state_dict(models["lorakit"])[key], value), key
    torch.testing.assert_close(outputs["lorakit"], outputs["peft"], rtol=0, atol=1e-6)
    assert (outputs["lorakit"] - Grouped(kernel, groups)(x)).abs().max() > 1e-3
    models["lorakit"].save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(Grouped(kernel, groups), tmp_path)
    torch.testing.assert_close(loaded(x), outputs["lorakit"], rtol=0, atol=1e-6)


def test_dilated_convolutions_and_pissa_on_grouped_ones_are_refused():
    with pytest.raises(ValueError, match="dilation=1"):
        lorakit.get_peft_model(nn.Sequential(nn.Conv2d(4, 4, 3, dilation=2)),
                               lorakit.LoraConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is not supported on a convolution"):
        lorakit.get_peft_model(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)),
                               lorakit.LoraConfig(target_modules=["0"], r=4, init_lora_weights="pissa"))
