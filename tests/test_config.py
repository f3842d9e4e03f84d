"""LoraConfig: PEFT's field names and defaults, its JSON file both ways, and helpful validation errors."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest

from lorakit import LoraConfig, TaskType
from lorakit.errors import AdapterFileError

peft = pytest.importorskip("peft")


def test_fields_and_defaults_match_peft() -> None:
    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert ours <= theirs, f"lorakit-only fields: {sorted(ours - theirs)}"
    default_ours, default_theirs = LoraConfig(), peft.LoraConfig()
    for name in sorted(ours):
        value = getattr(default_theirs, name)
        value = value.value if hasattr(value, "value") else value  # PEFT's enums (peft_type)
        assert getattr(default_ours, name) == value, name


def test_every_peft_only_key_is_known() -> None:
    """Each key PEFT writes is either a lorakit field, a feature lorakit refuses unless at its default, or
    bookkeeping; none is silently unknown."""
    from lorakit.config import _PEFT_INFO_KEYS, _PEFT_ONLY_KEYS

    written = set(peft.LoraConfig().to_dict())
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert written - fields - _PEFT_ONLY_KEYS - _PEFT_INFO_KEYS == set()


def test_save_load_round_trip(tmp_path: Path) -> None:
    config = LoraConfig(
        r=6,
        lora_alpha=12.5,
        target_modules=["v_proj", "q_proj", "q_proj"],
        lora_dropout=0.05,
        bias="lora_only",
        use_rslora=True,
        modules_to_save=["lm_head"],
        init_lora_weights="gaussian",
        layers_to_transform=[0, 2],
        layers_pattern="layers",
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3.0},
        use_dora=True,
        task_type=TaskType.CAUSAL_LM,
        base_model_name_or_path="some/model",
        exclude_modules=["k_proj"],
    )
    config.save_pretrained(tmp_path)
    loaded = LoraConfig.from_pretrained(tmp_path)
    assert loaded == dataclasses.replace(config, target_modules=["q_proj", "v_proj"])
    assert loaded.task_type == "CAUSAL_LM"
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["target_modules"] == ["q_proj", "v_proj"]
    # PEFT reads it with the same values.
    theirs = peft.LoraConfig.from_pretrained(tmp_path)
    for field in dataclasses.fields(LoraConfig):
        value = getattr(theirs, field.name)
        value = value.value if hasattr(value, "value") else value
        ours = getattr(loaded, field.name)
        assert (sorted(value) if isinstance(value, set) else value) == ours, field.name


def test_reads_peft_written_config_silently(tmp_path: Path) -> None:
    peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True, task_type="CAUSAL_LM"
    ).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = LoraConfig.from_pretrained(tmp_path)
    assert (config.r, config.lora_alpha, config.use_dora, config.task_type) == (4, 16, True, "CAUSAL_LM")
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]


def _write(tmp_path: Path, **extra) -> Path:
    data = {**peft.LoraConfig(r=4, target_modules=["q_proj"]).to_dict(), **extra}
    data = {
        k: (sorted(v) if isinstance(v, set) else v.value if hasattr(v, "value") else v)
        for k, v in data.items()
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    return tmp_path


def test_unknown_key_warns_naming_it(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="frobnicate"):
        config = LoraConfig.from_pretrained(_write(tmp_path, frobnicate=3))
    assert config.r == 4


@pytest.mark.parametrize(("key", "value"), [
    ("use_qalora", True), ("layer_replication", [[0, 1]]), ("trainable_token_indices", [1, 2]),
    ("target_parameters", ["experts.gate_up_proj"]), ("loftq_config", {"loftq_bits": 4}),
])
def test_unsupported_peft_feature_raises_naming_the_key(tmp_path: Path, key: str, value) -> None:
    with pytest.raises(ValueError, match=key):
        LoraConfig.from_pretrained(_write(tmp_path, **{key: value}))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"r": -2}, "r"),
        ({"r": 2.5}, "r"),
        ({"r": True}, "r"),
        ({"bias": "some"}, "bias"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"init_lora_weights": "xavier"}, "init_lora_weights"),
        ({"init_lora_weights": None}, "init_lora_weights"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": [1, 2]}, "target_modules"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"use_dora": True, "lora_bias": True}, "lora_bias"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}"):
        LoraConfig(**kwargs)


def test_invalid_value_in_file_names_file_and_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"adapter_config\.json.*LoraConfig\.bias"):
        LoraConfig.from_pretrained(_write(tmp_path, bias="sometimes"))


def test_missing_or_corrupt_config_file(tmp_path: Path) -> None:
    with pytest.raises(AdapterFileError, match="adapter_config.json"):
        LoraConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        LoraConfig.from_pretrained(tmp_path)


def test_rank_and_alpha_patterns_resolve_like_peft() -> None:
    config = LoraConfig(r=8, lora_alpha=16, rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                       alpha_pattern={"q_proj": 4}, use_rslora=True)
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 2
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 6
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 8
    assert config.rank_for("model.layers.0.self_attn.xv_proj") == 8, "keys match at a dot boundary"
    assert config.alpha_for("model.layers.1.self_attn.q_proj") == 4
    assert config.scaling(4, 16) == 8.0
