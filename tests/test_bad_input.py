"""The bad-input matrix: every command, fed broken files and impossible values, answers with one line
naming the file / line / key / module and what was expected, exits 1 (runtime) or 2 (usage), shows no
traceback unless --debug, and leaves nothing half-written."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama

import lorakit
from lorakit.cli.main import main


@pytest.fixture(scope="module")
def files(tiny_chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good adapter and a zoo of broken inputs for the tiny chat model."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bad-inputs")
    torch.manual_seed(0)
    good = lorakit.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir),
        lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    good.save_pretrained(root / "good")
    other_base = tiny_llama(hidden=64, vocab_size=49152)  # the tiny chat model's vocabulary, twice its width
    other_config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    lorakit.get_peft_model(other_base, other_config).save_pretrained(root / "other-base")
    gpt2 = tiny_gpt2(vocab_size=49152)
    lorakit.get_peft_model(gpt2, lorakit.LoraConfig(r=4, target_modules=["c_attn"])).save_pretrained(
        root / "other-arch"
    )

    truncated = root / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_text((root / "good" / "adapter_config.json").read_text())
    data = (root / "good" / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])

    bad_config = root / "bad-config"
    bad_config.mkdir()
    config = json.loads((root / "good" / "adapter_config.json").read_text())
    (bad_config / "adapter_config.json").write_text(json.dumps({**config, "r": 0}))
    (bad_config / "adapter_model.safetensors").write_bytes(data)

    broken_json = root / "broken-json"
    broken_json.mkdir()
    (broken_json / "adapter_config.json").write_text("{not json")
    (broken_json / "adapter_model.safetensors").write_bytes(data)

    int_weights = root / "int-weights"
    int_weights.mkdir()
    (int_weights / "adapter_config.json").write_text((root / "good" / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    save_file(
        {
            k: v.to(torch.int32)
            for k, v in load_file(str(root / "good" / "adapter_model.safetensors")).items()
        },
        str(int_weights / "adapter_model.safetensors"),
    )

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4
    (root / "ok.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    long = {
        "messages": [
            {"role": "user", "content": "count"},
            {"role": "assistant", "content": " ".join(["one"] * 200)},
        ]
    }
    (root / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows[:2], long, long]))
    (root / "malformed.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    (root / "no-assistant.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )
    (root / "bad-role.jsonl").write_text(
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n"
    )
    (root / "empty.jsonl").write_text("")
    (root / "latin1.jsonl").write_bytes(
        json.dumps(rows[0]).encode() + b"\n" + '{"text": "caf\xe9"}'.encode("latin-1") + b"\n"
    )
    (root / "a-file").write_text("not a directory")
    return {p.name: p for p in root.iterdir()}


def run(capfd, *args: str) -> tuple[int, str]:
    """Run the CLI in this process; (exit code, stderr)."""
    with pytest.raises(SystemExit) as done:
        main(list(args))
    return done.value.code or 0, capfd.readouterr().err


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# (command builder, expected text in the error line); all exit 1.
ADAPTER_CASES = {
    "missing directory": (lambda f: f["good"].parent / "nope", "adapter directory not found"),
    "truncated safetensors": (lambda f: f["truncated"], "adapter_model.safetensors: cannot read safetensors"),
    "invalid config value": (lambda f: f["bad-config"], "LoraConfig.r: expected a positive integer, got 0"),
    "corrupt config": (lambda f: f["broken-json"], "adapter_config.json: not valid JSON"),
    "another base (shapes)": (lambda f: f["other-base"], "does not fit the model's"),
    "another architecture": (lambda f: f["other-arch"], "c_attn"),
    "integer weights": (lambda f: f["int-weights"], "not a floating-point type"),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_eval_with_a_bad_adapter(case: str, files, tiny_chat_model_dir, capfd) -> None:
    adapter, expected = ADAPTER_CASES[case]
    code, err = run(capfd, "eval", "--model", str(tiny_chat_model_dir), "--adapter", str(adapter(files)),
                    "--data", str(files["ok.jsonl"]), "--max-new-tokens", "2")
    assert code == 1
    assert expected in one_error_line(err)


@pytest.mark.parametrize("case", ["missing directory", "truncated safetensors", "another base (shapes)"])
def test_merge_with_a_bad_adapter_writes_nothing(
    case: str, files, tiny_chat_model_dir, tmp_path, capfd
) -> None:
    adapter, expected = ADAPTER_CASES[case]
    out = tmp_path / "merged"
    code, err = run(
        capfd,
        "merge",
        "--model",
        str(tiny_chat_model_dir),
        "--adapter",
        str(adapter(files)),
        "--output",
        str(out),
    )
    assert code == 1
    assert one_error_line(err)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


DATA_CASES = {
    "missing file": ("missing.jsonl", "missing.jsonl: no such file"),
    "malformed JSON": ("malformed.jsonl", "malformed.jsonl line 2"),
    "no assistant turn": ("no-assistant.jsonl", "no-assistant.jsonl line 1"),
    "unknown role": ("bad-role.jsonl", "bad-role.jsonl line 1"),
    "empty": ("empty.jsonl", "empty.jsonl: no examples"),
    "non-UTF-8": ("latin1.jsonl", "latin1.jsonl line 2: not valid UTF-8"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_train_with_bad_data_fails_before_loading_the_model(
    case: str, files, tiny_chat_model_dir, tmp_path, capfd
) -> None:
    name, expected = DATA_CASES[case]
    data = files.get(name, files["ok.jsonl"].parent / name)
    out = tmp_path / "run"
    code, err = run(
        capfd, "train", "--model", str(tiny_chat_model_dir), "--data", str(data), "--output", str(out)
    )
    assert code == 1
    assert expected in one_error_line(err)
    assert not out.exists()


@pytest.mark.parametrize(("args", "code", "expected"), [
    (["train", "--learning-rate", "-1"], 1, "--learning-rate: expected a positive number"),
    (["train", "--batch-size", "0"], 1, "--batch-size: expected a positive integer"),
    (["train", "--lora-dropout", "1.5"], 1, "--lora-dropout: expected a probability in [0, 1)"),
    (["train", "--r", "many"], 2, "Invalid value for '--r'"),
    (["train", "--no-such-option"], 2, "No such option"),
    (["merge", "--dtype", "float8", "--adapter", "x", "--output", "y"], 2, "Invalid value for '--dtype'"),
    (["generate", "hi", "--model", "no/such/dir/model"], 1, "no/such/dir/model: no such model directory"),
    (["inspect", "no-such-adapter"], 1, "no-such-adapter"),
])
def test_impossible_values_and_usage_errors(args, code: int, expected: str, capfd) -> None:
    got, err = run(capfd, *args)
    assert got == code, err
    assert expected in err and "Traceback" not in err
    if code == 1:
        one_error_line(err)


def test_output_path_that_is_a_file(files, tiny_chat_model_dir, capfd) -> None:
    code, err = run(capfd, "train", "--model", str(tiny_chat_model_dir), "--data", str(files["ok.jsonl"]),
                    "--output", str(files["a-file"]))
    assert code == 1 and "exists and is not a directory" in one_error_line(err)
    code, err = run(capfd, "merge", "--model", str(tiny_chat_model_dir), "--adapter", str(files["good"]),
                    "--output", str(files["a-file"]))
    assert code == 1 and "a-file" in one_error_line(err)
    assert files["a-file"].read_text() == "not a directory"


def test_sequences_over_the_length_limit_are_truncated_and_counted(
    files, tiny_chat_model_dir, tmp_path
) -> None:
    from lorakit.train.config import TrainConfig
    from lorakit.train.sft import train

    result = train(TrainConfig(model=str(tiny_chat_model_dir), data=str(files["long.jsonl"]),
                               output=str(tmp_path / "r"), max_seq_len=64, max_steps=1, batch_size=2))
    assert result.report["truncated_rows"] == 2 and result.report["train_rows"] == 4
    with pytest.raises(lorakit.DataError, match="ok.jsonl"):
        train(
            TrainConfig(
                model=str(tiny_chat_model_dir),
                data=str(files["ok.jsonl"]),
                output=str(tmp_path / "s"),
                max_seq_len=8,
                max_steps=1,
                batch_size=2,
            )
        )


def test_disk_full_during_save_keeps_the_previous_adapter(
    files, tiny_chat_model_dir, tmp_path, monkeypatch
) -> None:
    from transformers import AutoModelForCausalLM

    from lorakit.io import peft_format

    model = lorakit.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir), files["good"]
    )
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    before = (target / "adapter_model.safetensors").read_bytes()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a partial write, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(peft_format, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(target)
    assert (target / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors"]


def test_read_only_output_gives_one_line(files, tiny_chat_model_dir, tmp_path, capfd, monkeypatch) -> None:
    import os

    from lorakit.io import atomic

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "merged"))

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", refuse)
    code, err = run(capfd, "merge", "--model", str(tiny_chat_model_dir), "--adapter", str(files["good"]),
                    "--output", str(tmp_path / "merged"))
    assert code == 1
    assert one_error_line(err) == f"error: {tmp_path / 'merged'}: Permission denied"
    assert os.listdir(tmp_path) == []


def test_debug_shows_the_traceback(files, tiny_chat_model_dir) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorakit",
            "eval",
            "--debug",
            "--model",
            str(tiny_chat_model_dir),
            "--adapter",
            str(files["truncated"]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "Traceback" in done.stderr and "cannot read safetensors" in done.stderr
    plain = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorakit",
            "eval",
            "--model",
            str(tiny_chat_model_dir),
            "--adapter",
            str(files["truncated"]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("error: ")
