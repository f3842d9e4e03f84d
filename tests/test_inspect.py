"""`lorakit inspect` and `lorakit.inspect.inspect_adapter` (issue 6): per-module rank, alpha, scaling and
‖ΔW‖_F checked against the live adapter model and explicit matrix products; JSON output; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import (
    clone_model,
    file_tensors,
    lk_config,
    perturb_adapter,
    quiet,
    seeded,
    tiny_gpt2,
    tiny_llama,
)

import lorakit
from lorakit.cli.main import main
from lorakit.inject import lora_layers
from lorakit.inspect import inspect_adapter

PREFIX = "base_model.model."


def save_adapter(base: torch.nn.Module, directory: Path, **config) -> lorakit.PeftModel:
    with quiet(), seeded(0):
        model = lorakit.get_peft_model(clone_model(base), lk_config(init_lora_weights=False, **config))
    perturb_adapter(model, scale=0.1)
    model.save_pretrained(directory)
    return model


def explicit_norm(tensors: dict[str, torch.Tensor], module: str, scaling: float, embedding: bool) -> float:
    names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    a, b = (tensors[f"{PREFIX}{module}.{n}"].double() for n in names)
    return float(torch.linalg.matrix_norm(scaling * (b @ a)))


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def test_summary_matches_the_adapter_model(tmp_path: Path) -> None:
    model = save_adapter(
        tiny_llama(),
        tmp_path / "adapter",
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        r=8,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"v_proj": 4},
        alpha_pattern={"layers.1.self_attn.q_proj": 5.0},
        modules_to_save=["lm_head"],
    )
    summary = inspect_adapter(tmp_path / "adapter")
    tensors = file_tensors(tmp_path / "adapter")
    layers = dict(lora_layers(model.get_base_model()))
    assert [m.name for m in summary.modules] == sorted(layers)
    for module in summary.modules:
        layer = layers[module.name]
        assert (module.r, module.alpha) == (layer.r["default"], layer.lora_alpha["default"])
        assert module.scaling == pytest.approx(layer.scaling["default"], rel=1e-12)
        assert tuple(module.shape) == tuple(layer.weight.shape)  # Linear (out, in), Embedding (V, D)
        expected = explicit_norm(tensors, module.name, layer.scaling["default"], module.kind == "embedding")
        assert module.delta_norm == pytest.approx(expected, rel=1e-9)
        assert module.delta_norm == pytest.approx(
            float(torch.linalg.matrix_norm(layer.delta_weight("default"))), rel=1e-5
        )
    by_name = {m.name: m for m in summary.modules}
    assert by_name["model.layers.0.self_attn.v_proj"].r == 4
    assert by_name["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(5.0 / 8**0.5)
    assert by_name["model.embed_tokens"].kind == "embedding"
    assert summary.parameters == sum(t.numel() for t in tensors.values())
    assert summary.file_bytes == (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert summary.dtypes == ["float32"]
    saved = {t.name: t for t in summary.saved_tensors}
    assert saved["lm_head.weight"].modules_to_save and saved["lm_head.weight"].shape == (96, 32)
    assert not saved["model.embed_tokens.weight"].modules_to_save  # the embedding base saved alongside
    assert summary.use_rslora and summary.rank_pattern == {"v_proj": 4}


def test_dora_conv1d_and_lora_bias_flags(tmp_path: Path) -> None:
    save_adapter(
        tiny_gpt2(), tmp_path / "dora", target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True
    )
    save_adapter(tiny_gpt2(), tmp_path / "bias", target_modules=["c_fc"], lora_bias=True, fan_in_fan_out=True)
    dora = inspect_adapter(tmp_path / "dora").modules
    assert all(m.dora and not m.lora_bias for m in dora) and dora[0].shape == (96, 32)
    assert dora[0].parameters == 8 * 32 + 96 * 8 + 96  # A, B and one magnitude per output feature
    bias = inspect_adapter(tmp_path / "bias").modules
    assert all(m.lora_bias and not m.dora for m in bias) and bias[0].parameters == 8 * 32 + 128 * 8 + 128


def test_peft_saved_adapter(tmp_path: Path) -> None:
    import peft

    with quiet(), seeded(0):
        model = peft.get_peft_model(
            tiny_llama(),
            peft.LoraConfig(
                target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, use_dora=True, init_lora_weights=False
            ),
        )
    model.save_pretrained(tmp_path / "peft")
    summary = inspect_adapter(tmp_path / "peft")
    tensors = file_tensors(tmp_path / "peft")
    assert len(summary.modules) == 4 and all(m.dora and m.scaling == 2.0 for m in summary.modules)
    for module in summary.modules:
        assert module.delta_norm == pytest.approx(explicit_norm(tensors, module.name, 2.0, False), rel=1e-9)


def test_cli_table_and_json(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    save_adapter(
        tiny_llama(), tmp_path / "adapter", target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}
    )
    code, out, _ = run(capsys, "inspect", tmp_path / "adapter")
    assert code == 0
    for text in ("model.layers.1.self_attn.v_proj", "rank r", "pattern {'v_proj': 2}", "‖ΔW‖_F", "alpha / r"):
        assert text in out
    code, out, _ = run(capsys, "inspect", tmp_path / "adapter", "--json")
    data = json.loads(out)
    summary = inspect_adapter(tmp_path / "adapter")
    assert code == 0 and data == json.loads(json.dumps(summary.to_dict()))
    assert [m["r"] for m in data["modules"]] == [8, 2, 8, 2]
    assert data["modules"][0]["delta_norm"] > 0


def _write(directory: Path, name: str, content: bytes) -> None:
    (directory / name).write_bytes(content)


@pytest.mark.parametrize(
    "spoil, expected",
    [
        (lambda d: None, "adapter directory not found"),
        (lambda d: d.mkdir(), "adapter config not found"),
        (lambda d: (d.mkdir(), _write(d, "adapter_config.json", b"{oops")), "not valid JSON"),
        (
            lambda d: (d.mkdir(), _write(d, "adapter_config.json", b"{}")),
            "no adapter_model.safetensors found",
        ),
        (
            lambda d: (
                d.mkdir(),
                _write(d, "adapter_config.json", b"{}"),
                _write(d, "adapter_model.safetensors", b"junk" * 4),
            ),
            "not a readable safetensors file",
        ),
    ],
)
def test_bad_directories_are_one_line_errors(tmp_path: Path, capsys, spoil, expected: str) -> None:
    directory = tmp_path / "adapter"
    spoil(directory)
    code, out, err = run(capsys, "inspect", directory)
    assert code == 1 and out == ""
    assert (
        len(err.strip().splitlines()) == 1
        and err.startswith("error: ")
        and expected in err
        and str(directory) in err
    )
