"""Safe loading: no remote code unless asked, adapter names cannot escape the output directory, and the
config and data parsers only ever fail with their documented errors (fuzzed with hypothesis).

The pickle case (an `adapter_model.bin` whose unpickling would create a file) is in
tests/test_layers.py::test_pickled_bin_is_never_unpickled_unsafely.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorakit
from lorakit.errors import DataError

# transformers runs a copy of the module from its own cache, so the marker path is written in absolutely.
REMOTE_CODE = '''
from pathlib import Path
Path({marker!r}).write_text("pwned")
from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    model_type = "evil"
'''


@pytest.fixture()
def remote_code_model(tmp_path: Path, tiny_chat_model_dir: Path) -> Path:
    """A model directory whose config points at custom code that would leave a marker file if run."""
    directory = tmp_path / "evil-model"
    directory.mkdir()
    config = json.loads((tiny_chat_model_dir / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "configuration_evil.py").write_text(
        REMOTE_CODE.format(marker=str(directory / "REMOTE_CODE_RAN"))
    )
    return directory


def test_remote_code_never_runs_without_the_flag(remote_code_model: Path) -> None:
    from lorakit.models.sources import load_causal_lm

    with pytest.raises(lorakit.LorakitError, match="auto_map"):
        load_causal_lm(remote_code_model)
    assert not (remote_code_model / "REMOTE_CODE_RAN").exists()
    done = subprocess.run(
        [sys.executable, "-m", "lorakit", "generate", "hi", "--model", str(remote_code_model)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        "runs its own Python code (auto_map); pass --trust-remote-code"
        in done.stderr.strip().splitlines()[-1]
    )
    assert not (remote_code_model / "REMOTE_CODE_RAN").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "hi"],
        ["eval", "--limit", "1"],
        ["train", "--max-steps", "1"],
        ["dpo", "--max-steps", "1"],
    ],
)
def test_trust_remote_code_flag_lets_the_code_run(
    remote_code_model: Path, tiny_chat_model_dir: Path, tmp_path: Path, command: list[str]
) -> None:
    """The opt-in reaches transformers: with the flag the model's own code runs (here it only leaves its
    marker; the made-up architecture then fails to build, which is fine)."""
    for tokenizer_file in tiny_chat_model_dir.glob("tokenizer*"):
        shutil.copy(tokenizer_file, remote_code_model)
    output = ["--output", str(tmp_path / "run")] if command[0] in ("train", "dpo") else []
    subprocess.run([sys.executable, "-m", "lorakit", *command, "--model", str(remote_code_model), *output,
                    "--trust-remote-code"], capture_output=True, text=True, timeout=300)
    assert (remote_code_model / "REMOTE_CODE_RAN").read_text() == "pwned"


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "", "x\\y", "/abs", "a b"])
def test_adapter_names_cannot_become_paths(name: str, tmp_path: Path) -> None:
    from tiny_models import tiny_llama

    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="adapter name"):
        model.add_adapter(name, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_adapter_name_with_a_path_separator_is_refused(tiny_chat_model_dir: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorakit",
            "generate",
            "hi",
            "--model",
            str(tiny_chat_model_dir),
            "--adapter",
            f"../x={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "adapter name" in done.stderr and "Traceback" not in done.stderr


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5000) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
config_keys = st.sampled_from(
    [
        "r",
        "lora_alpha",
        "lora_dropout",
        "bias",
        "target_modules",
        "init_lora_weights",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
        "use_dora",
        "use_qalora",
        "peft_type",
        "unknown_key",
        "task_type",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(config_keys, json_values, max_size=6))
def test_lora_config_parsing_only_fails_with_value_errors(data: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = lorakit.LoraConfig.from_dict(data, source="fuzz.json")
        except ValueError as err:
            assert str(err).startswith("fuzz.json: ")
            assert "\n" not in str(err)
            return
    assert config.r > 0 and 0 <= config.lora_dropout < 1


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "r",
                "learning_rate",
                "batch_size",
                "epochs",
                "method",
                "lora_dropout",
                "max_steps",
                "target_modules",
                "init_lora_weights",
                "rank_pattern",
                "seed",
                "load_in_4bit",
                "bogus",
            ]
        ),
        json_values,
        max_size=5,
    )
)
def test_train_options_only_fail_with_one_line_naming_the_file(data: dict) -> None:
    """`TrainConfig.from_options` is the path every CLI flag, YAML file and dict takes."""
    from lorakit.train.config import TrainConfig

    try:
        config = TrainConfig.from_options(data, source="run.yaml")
    except ValueError as err:
        assert str(err).startswith("run.yaml: ") and "\n" not in str(err)
        return
    assert config.lora.r > 0 and config.batch_size > 0 and isinstance(config.seed, int)


row = st.dictionaries(st.sampled_from(["messages", "prompt", "completion", "text", "role", "content", "x"]),
                      json_values, max_size=3)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "bot"]),
                                  "content": st.text(max_size=10) | st.integers()})
chat_row = st.fixed_dictionaries({"messages": st.lists(message, max_size=4)})
line = st.one_of(
    row.map(json.dumps),
    chat_row.map(json.dumps),
    st.text(max_size=20),
    st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(line, max_size=5))
def test_data_parsing_only_fails_with_data_errors(tmp_path: Path, lines: list[str]) -> None:
    from lorakit.train.data import load_records

    path = tmp_path / "fuzz.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", errors="surrogateescape"))
    try:
        records = load_records(path)
    except DataError as err:
        assert str(err).startswith("fuzz.jsonl") and "\n" not in str(err)
        return
    assert records


def test_adapter_weights_load_without_pickle(tmp_path: Path) -> None:
    """A legacy adapter_model.bin of plain tensors loads through torch.load(weights_only=True)."""
    from tiny_models import tiny_llama

    model = lorakit.get_peft_model(
        tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    torch.save(load_file(str(tmp_path / "adapter_model.safetensors")), tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_model.safetensors").unlink()
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
