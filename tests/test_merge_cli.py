"""`lorakit merge` on the command line (issue 6): success paths, one-line errors that leave nothing
behind, --overwrite, --config YAML, and a merge killed half-way."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import (
    clone_model,
    lk_config,
    logits,
    max_diff,
    perturb_adapter,
    quiet,
    seeded,
    tiny_gpt2,
    tiny_llama,
)

import lorakit
from lorakit.cli.main import main
from lorakit.errors import AdapterFileError

REPO = Path(__file__).resolve().parent.parent


def save_adapter(base: torch.nn.Module, directory: Path, seed: int = 7, **config) -> lorakit.PeftModel:
    with quiet(), seeded(seed):
        model = lorakit.get_peft_model(clone_model(base), lk_config(init_lora_weights=False, **config))
    perturb_adapter(model, seed=seed, scale=0.1)
    model.eval().save_pretrained(directory)
    return model


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, lorakit.PeftModel]:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    model = save_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    return tmp_path / "base", tmp_path / "adapter", model


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def load(directory: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with quiet():
        return AutoModelForCausalLM.from_pretrained(directory).eval()


def test_merge_command_writes_verified_model(setup, tmp_path: Path, capsys) -> None:
    base, adapter, model = setup
    code, out, _ = run(
        capsys,
        "merge",
        "--model",
        base,
        "--adapter",
        adapter,
        "--output",
        tmp_path / "out",
        "--max-shard-size",
        "30KB",
    )
    assert code == 0
    assert "verification" in out and "passed" in out and "4 merged" in out
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    bound = report["memory"]["predicted_peak_above_start_bytes"]
    assert re.search(rf"above the start \(bound\s+{bound / 2**20:,.0f}\s+MiB", out)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert (
        report["tensors_merged"] == 4
        and report["shards"] > 1
        and report["verification"]["max_ulp_error"] <= 1.0
    )
    assert max_diff(logits(load(tmp_path / "out")), logits(model)) <= 1e-4


def test_weights_dtype_and_yaml_config(setup, tmp_path: Path, capsys) -> None:
    base, first, _ = setup
    second = tmp_path / "second"
    save_adapter(load(base), second, seed=3, target_modules=["o_proj"], r=4)
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"model: {base}\nadapter: [{first}, {second}]\nweights: [0.7, 0.3]\ndtype: bfloat16\nverify: false\n"
    )
    code, out, _ = run(capsys, "merge", "--config", config, "--output", tmp_path / "out")
    assert code == 0 and "skipped" in out
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert (
        report["weights"] == [0.7, 0.3] and report["dtype"] == "bfloat16" and report["verification"] is None
    )
    assert report["tensors_merged"] == 6  # q, v from the first adapter and o from the second, in 2 layers
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_verify_outputs_flag_prints_logit_comparison(setup, tmp_path: Path, capsys) -> None:
    base, adapter, _ = setup
    code, out, _ = run(
        capsys,
        "merge",
        "--model",
        base,
        "--adapter",
        adapter,
        "--output",
        tmp_path / "out",
        "--verify-outputs",
    )
    assert code == 0 and "argmax agreement 100.0%" in out and "perplexity" in out
    outputs = json.loads((tmp_path / "out" / "merge_report.json").read_text())["outputs"]
    assert outputs["max_logit_diff"] <= 1e-4


def test_existing_output_needs_overwrite(setup, tmp_path: Path, capsys) -> None:
    base, adapter, _ = setup
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("previous run")
    code, _, err = run(capsys, "merge", "--model", base, "--adapter", adapter, "--output", out_dir)
    assert code == 1 and err.strip().startswith("error:") and "already exists" in err and "--overwrite" in err
    assert (out_dir / "old.txt").exists()
    code, _, _ = run(
        capsys, "merge", "--model", base, "--adapter", adapter, "--output", out_dir, "--overwrite"
    )
    assert code == 0 and not (out_dir / "old.txt").exists() and (out_dir / "model.safetensors").exists()


def _truncate(adapter: Path) -> None:
    file = adapter / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])


def _garbage(adapter: Path) -> None:
    (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")


def _other_base(adapter: Path) -> None:
    save_adapter(tiny_llama(hidden=64), adapter, target_modules=["q_proj", "v_proj"])


def _other_architecture(adapter: Path) -> None:
    save_adapter(tiny_gpt2(), adapter, target_modules=["c_attn"], fan_in_fan_out=True)


def _no_weights(adapter: Path) -> None:
    (adapter / "adapter_model.safetensors").unlink()


ADAPTER_ERRORS = {
    "truncated": (_truncate, ["adapter_model.safetensors", "truncated or corrupt"]),
    "garbage": (_garbage, ["adapter_model.safetensors", "not a readable safetensors file"]),
    "other_base": (
        _other_base,
        ["module 'model.layers.0.self_attn.q_proj'", "(64, 64)", "(32, 32)", "another base model"],
    ),
    "unknown_module": (
        _other_architecture,
        ["module 'transformer.h.0.attn.c_attn' is not in the base model"],
    ),
    "no_weights": (_no_weights, ["no adapter_model.safetensors found"]),
}


@pytest.mark.parametrize("case", list(ADAPTER_ERRORS))
def test_bad_adapter_is_one_line_error_and_leaves_nothing(setup, tmp_path: Path, capsys, case: str) -> None:
    base, adapter, _ = setup
    spoil, expected = ADAPTER_ERRORS[case]
    spoil(adapter)
    code, out, err = run(capsys, "merge", "--model", base, "--adapter", adapter, "--output", tmp_path / "out")
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    for part in expected:
        assert part in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_shard_names_the_file(setup, tmp_path: Path, capsys) -> None:
    base, adapter, _ = setup
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (base / shard).unlink()
    code, _, err = run(capsys, "merge", "--model", base, "--adapter", adapter, "--output", tmp_path / "out")
    assert code == 1 and shard in err and "model.safetensors.index.json" in err and "missing" in err
    assert not (tmp_path / "out").exists()


def test_truncated_base_shard_names_the_file(setup, tmp_path: Path, capsys) -> None:
    base, adapter, _ = setup
    shard = sorted(base.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-8])
    code, _, err = run(capsys, "merge", "--model", base, "--adapter", adapter, "--output", tmp_path / "out")
    assert code == 1 and shard.name in err and "truncated or corrupt" in err


@pytest.mark.parametrize("args, expected", [
    (["--weights", "0.5,0.2"], "1 adapter(s) but 2 weight(s)"),
    (["--weights", "half"], "expected numbers"),
    (["--max-shard-size", "lots"], "max shard size 'lots'"),
])
def test_bad_options(setup, tmp_path: Path, capsys, args: list[str], expected: str) -> None:
    base, adapter, _ = setup
    code, _, err = run(
        capsys, "merge", "--model", base, "--adapter", adapter, "--output", tmp_path / "out", *args
    )
    assert code in (1, 2) and expected in err
    assert not (tmp_path / "out").exists()


def test_quantized_base_is_refused(setup, tmp_path: Path, capsys) -> None:
    base, adapter, _ = setup
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "merge", "--model", base, "--adapter", adapter, "--output", tmp_path / "out")
    assert code == 1 and "quantized (bitsandbytes)" in err and "config.json" in err
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_exception(setup, tmp_path: Path) -> None:
    base, adapter, _ = setup
    _truncate(adapter)
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        main(
            [
                "merge",
                "--model",
                str(base),
                "--adapter",
                str(adapter),
                "--output",
                str(tmp_path / "out"),
                "--debug",
            ]
        )


def test_killed_merge_leaves_no_complete_output(setup, tmp_path: Path) -> None:
    """SIGKILL after a few tensors: the output path never appears; a rerun succeeds."""
    base, adapter, model = setup
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        from lorakit.io import checkpoint
        from lorakit.merge.streaming import merge_checkpoint
        original, count = checkpoint.ShardedWriter.write, [0]
        def write(self, name, tensor):
            count[0] += 1
            if count[0] == 6:
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, name, tensor)
        checkpoint.ShardedWriter.write = write
        merge_checkpoint({str(base)!r}, {str(adapter)!r}, {str(out)!r}, max_shard_size="20KB")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert leftovers and all(p.name.endswith(".tmp") and not (p / "config.json").exists() for p in leftovers)
    assert any(
        p.name.endswith(".safetensors") for left in leftovers for p in left.iterdir()
    )  # it was mid-write
    subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "lorakit"),
            "merge",
            "--model",
            str(base),
            "--adapter",
            str(adapter),
            "--output",
            str(out),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert max_diff(logits(load(out)), logits(model)) <= 1e-4


@pytest.mark.slow
def test_merge_into_the_default_model(default_model_dir: Path, tmp_path: Path, capsys) -> None:
    """No --model: the embedded SmolLM2 (tied embeddings, real tokenizer and chat template)."""
    from transformers import AutoTokenizer

    from lorakit.models import load_causal_lm

    model = save_adapter(
        load_causal_lm(), tmp_path / "adapter", target_modules=["q_proj", "v_proj", "embed_tokens"], r=4
    )
    code, out, _ = run(
        capsys, "merge", "--adapter", tmp_path / "adapter", "--output", tmp_path / "out", "--verify-outputs"
    )
    assert code == 0 and "untied" in out
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert (
        report["base"] == str(default_model_dir)
        and report["untied_embeddings"]
        and report["tensors_added"] == 1
    )
    # The merged tensors are exact (0 ulp, checked by the verification above). The logits are compared with
    # a loose bound: this random adapter (init_lora_weights=False, r=4 on q, v and the embedding) drives the
    # 135M model's last hidden states to ~3,000, so ulp-level differences between the merged and the
    # unmerged forward grow to ~3e-3 in the logits (a prompt of plain text: 5e-5).
    assert report["outputs"]["argmax_agreement"] == 1.0 and report["outputs"]["max_logit_diff"] <= 1e-2
    assert report["verification"]["passed"] and report["verification"]["max_ulp_error"] == 0.0
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (default_model_dir / name).read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    assert max_diff(logits(load(tmp_path / "out"), ids), logits(model, ids)) <= 1e-3
