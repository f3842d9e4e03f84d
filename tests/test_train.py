"""`lorakit train` / `lorakit.train.sft.train`: the loss, the loop, checkpoints, resume, outputs and CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import CrashAfter, tiny_gpt2, tiny_llama

import lorakit
from lorakit.errors import LorakitError
from lorakit.train.config import TrainConfig
from lorakit.train.loss import causal_lm_loss
from lorakit.train.sft import SFTObjective, train
from lorakit.train.trainer import Trainer


def _config(output: Path, model_dir: Path, data: dict[str, Path], **overrides) -> TrainConfig:
    options = dict(
        model=str(model_dir),
        data=str(data["train"]),
        validation_data=str(data["validation"]),
        test_data=str(data["test"]),
        output=str(output),
        max_steps=6,
        eval_every=6,
        save_every=2,
        batch_size=4,
        learning_rate=5e-3,
        warmup_steps=0,
        lora_dropout=0.1,
        eval_limit=4,
        eval_max_new_tokens=4,
        seed=3,
    )
    options.update(overrides)
    return TrainConfig.from_options(options)


# ---- the loss ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("chunk_size", [1024, 3], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_chunked_loss_equals_the_straightforward_loss_and_gradients(
    make, chunk_size: int, padding: str
) -> None:
    """Also covers dropping a right-padding mask (the faster SDPA path): HF's reference keeps the mask."""
    torch.manual_seed(0)
    ids = torch.randint(3, 96, (3, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100
    mask = torch.ones_like(ids)
    padded = slice(8, None) if padding == "right" else slice(0, 2)
    mask[2, padded] = 0
    labels[2, padded] = -100

    reference = lorakit.get_peft_model(
        make(), lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    ours = lorakit.get_peft_model(
        make(), lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    ours.load_state_dict(reference.state_dict())

    expected = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected.backward()
    total, count = causal_lm_loss(ours, ids, mask, labels, chunk_size=chunk_size)
    (total / count).backward()

    assert count.item() == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(total / count, expected, atol=1e-5, rtol=0)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, grads[name], atol=1e-5, rtol=1e-4), name


# ---- options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    ({"learning_rate": -1.0}, "--learning-rate: expected a positive number"),
    ({"batch_size": 0}, "--batch-size: expected a positive integer"),
    ({"lora_dropout": 1.0}, "--lora-dropout: expected a probability"),
    ({"method": "qlora"}, "--method: expected lora or full"),
    ({"init_lora_weights": "xavier"}, "--init-lora-weights: expected True, False"),
    ({"init_lora_weights": "pissa_niter_x"}, "--init-lora-weights: expected .* got 'pissa_niter_x'"),
    ({"r": 0}, "--r: expected a positive integer, got 0"),
    ({"seed": "x"}, "--seed: expected an integer, got 'x'"),
    ({"max_steps": 2.5}, "--max-steps: expected an integer or null, got 2.5"),
    ({"target_modules": 3}, "--target-modules: expected a list of strings or a string or null, got 3"),
    ({"load_in_8bit": True, "load_in_4bit": True}, "choose one"),
    ({"epochs": float("nan")}, "--epochs: expected a positive number"),
    ({"lr": 1e-3}, "unknown key 'lr'"),
])
def test_impossible_options_are_refused_naming_the_option(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_options(overrides)


def test_yaml_options_are_checked_like_flags_and_name_the_file(tmp_path) -> None:
    (tmp_path / "run.yaml").write_text("seed: x\n")
    with pytest.raises(ValueError, match=r"run.yaml: key 'seed': expected an integer, got 'x'"):
        TrainConfig.from_yaml(tmp_path / "run.yaml")
    (tmp_path / "ok.yaml").write_text("r: 4\nlora-alpha: 8\ntarget_modules: [q_proj]\nseed: 2\n")
    config = TrainConfig.from_yaml(tmp_path / "ok.yaml", max_steps=3)
    assert (config.lora.r, config.lora.lora_alpha, config.lora.target_modules) == (4, 8.0, ["q_proj"])
    assert (config.seed, config.max_steps) == (2, 3)
    # Options not given keep the trainer's LoRA defaults (all linear layers, alpha 16), not LoraConfig's.
    assert TrainConfig.from_options({}).lora == lorakit.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def test_saved_options_read_back_into_the_same_config(tmp_path) -> None:
    config = TrainConfig.from_options({"r": 4, "use_dora": True, "rank_pattern": {"q_proj": 2}, "seed": 5,
                                       "init_lora_weights": "olora", "max_steps": 7})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config.to_options()))
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == config


# ---- a whole run on a tiny model ---------------------------------------------------------------------


def test_lora_run_writes_adapter_metrics_curve_and_report(tmp_path, tiny_chat_model_dir, demo_subset) -> None:
    result = train(_config(tmp_path / "run", tiny_chat_model_dir, demo_subset, eval_every=3))
    out = result.output_dir
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl",
                 "loss_curve.png", "report.json", "train_config.yaml"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
    assert train_losses[-1] < train_losses[0]
    report = json.loads((out / "report.json").read_text())
    for key in ("trainable_params", "total_params", "peak_memory_mb", "tokens_per_second", "train_seconds",
                "final_train_loss", "final_val_loss", "exact_match_base", "exact_match_adapter"):
        assert key in report, key
    assert report["steps"] == 6 and report["test_rows"] == 4
    assert 0 < report["trainable_params"] < report["total_params"]
    assert yaml.safe_load((out / "train_config.yaml").read_text())["max_steps"] == 6
    # The saved adapter is PEFT's format and loads back onto the base.
    from transformers import AutoModelForCausalLM

    loaded = lorakit.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir), out / "adapter"
    )
    assert loaded.get_nb_trainable_parameters()[1] == report["total_params"]
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)


def test_resume_after_a_crash_matches_an_uninterrupted_run(
    tmp_path, tiny_chat_model_dir, demo_subset
) -> None:
    uninterrupted = train(_config(tmp_path / "a", tiny_chat_model_dir, demo_subset))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_config(tmp_path / "b", tiny_chat_model_dir, demo_subset), callbacks=[CrashAfter(2)])
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    resumed = train(_config(tmp_path / "b", tiny_chat_model_dir, demo_subset, resume=True))

    expected = load_file(str(uninterrupted.adapter_dir / "adapter_model.safetensors"))
    got = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-6, rtol=0), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


class NaNOnThirdStep(SFTObjective):
    """The SFT objective, but the third training step's loss is NaN (what a diverging run produces)."""

    steps = 0

    def loss(self, batch):
        total, figures = super().loss(batch)
        if self.model.training:
            self.steps += 1
            if self.steps == 3:
                total = total * math.nan
        return total, figures


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(
    tmp_path, tiny_chat_model_dir, demo_subset
) -> None:
    config = _config(tmp_path / "run", tiny_chat_model_dir, demo_subset)
    with pytest.raises(LorakitError, match=r"loss became nan at step 3.*checkpoint"):
        Trainer(config, NaNOnThirdStep(config)).run()
    assert json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["step"] == 2


def test_full_fine_tuning_baseline_trains_every_parameter(tmp_path, tiny_chat_model_dir, demo_subset) -> None:
    result = train(
        _config(
            tmp_path / "full", tiny_chat_model_dir, demo_subset, method="full", max_steps=3, lora_dropout=0.0
        )
    )
    assert (result.adapter_dir / "config.json").is_file() and (
        result.adapter_dir / "tokenizer_config.json"
    ).is_file()
    assert result.report["trainable_params"] == result.report["total_params"]
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(result.adapter_dir).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" in changed


def test_output_dir_of_another_run_is_refused_without_overwrite(
    tmp_path, tiny_chat_model_dir, demo_subset
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "something.txt").write_text("x")
    with pytest.raises(LorakitError, match="holds another run; pass --overwrite"):
        train(_config(out, tiny_chat_model_dir, demo_subset))
    with pytest.raises(LorakitError, match="no checkpoint to resume"):
        train(_config(out, tiny_chat_model_dir, demo_subset, resume=True))
    assert (out / "something.txt").read_text() == "x"


# ---- the command line -------------------------------------------------------------------------------


def _lorakit(*args: str) -> subprocess.CompletedProcess:
    # A wide terminal: usage errors come in a rich panel that wraps at the terminal's width, and a long tmp
    # path would otherwise split the message being checked.
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "300"},
    )


def test_cli_reads_yaml_config_and_flags_override_it(tmp_path, tiny_chat_model_dir, demo_subset) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_chat_model_dir),
                "data": str(demo_subset["train"]),
                "test-data": str(demo_subset["test"]),
                "max_steps": 5,
                "eval-every": 100,
                "batch-size": 4,
                "target-modules": ["q_proj", "v_proj"],
                "r": 2,
            }
        )
    )
    done = _lorakit(
        "train",
        "--config",
        str(config),
        "--max-steps",
        "2",
        "--output",
        str(tmp_path / "run"),
        "--eval-limit",
        "2",
    )
    assert done.returncode == 0, done.stderr
    saved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert saved["max_steps"] == 2 and saved["r"] == 2 and saved["target_modules"] == ["q_proj", "v_proj"]
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"] and adapter["r"] == 2


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--learning-rate", "-1"], 1, "error: --learning-rate: expected a positive number"),
    (["--batch-size", "0"], 1, "error: --batch-size: expected a positive integer"),
    (["--no-such-option", "1"], 2, "No such option"),
])
def test_cli_bad_options_give_one_line_and_no_traceback(tmp_path, args, code, message) -> None:
    done = _lorakit("train", "--output", str(tmp_path / "run"), *args)
    assert done.returncode == code
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_unknown_yaml_key_is_a_usage_error(tmp_path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("learning_rat: 0.1\n")
    done = _lorakit("train", "--config", str(config))
    assert done.returncode == 2
    assert "unknown key 'learning_rat'" in done.stderr and "Traceback" not in done.stderr


def test_attention_mask_is_dropped_only_when_it_changes_nothing() -> None:
    from lorakit.train.loss import _mask_changes_nothing

    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    scored = torch.tensor([[False, True, True], [True, False, False]])
    assert _mask_changes_nothing(right, scored)
    assert not _mask_changes_nothing(left, scored)
    scored_on_padding = torch.tensor([[False, True, True], [True, False, True]])  # row 1 predicts from a pad
    assert not _mask_changes_nothing(right, scored_on_padding)
