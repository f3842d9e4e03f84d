"""`--fsdp`: FSDP2-sharded training on 2 CPU processes (torchrun, gloo), checked against DDP and against
one process with twice the batch size; sharded checkpoints and exact resume after `kill -9` of one rank;
two "nodes"; the refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchrun_support import start, torchrun

from lorakit.errors import LorakitError
from lorakit.train.config import DPOConfig, TrainConfig
from lorakit.train.dpo import train_dpo
from lorakit.train.memory import rank_memory
from lorakit.train.sft import train


def _close(got: dict, expected: dict, atol: float = 1e-5) -> None:
    assert got.keys() == expected.keys() and got
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=atol, rtol=0), key


def _trainable(model: torch.nn.Module) -> dict:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _sft_options(model_dir: Path, data: dict, **extra) -> dict:
    options = dict(model=str(model_dir), data=str(data["train"]), validation_data=str(data["validation"]),
                   test_data=str(data["test"]), max_steps=4, eval_every=2, learning_rate=5e-3, warmup_steps=0,
                   batch_size=4, lora_dropout=0.0, eval_limit=2, eval_max_new_tokens=4, seed=3)
    return {**options, **extra}


def test_sharded_sft_equals_data_parallel_and_one_process(tmp_path, tiny_chat_model_dir, demo_subset) -> None:
    options = _sft_options(tiny_chat_model_dir, demo_subset)
    sharded = torchrun("train", {**options, "fsdp": True}, tmp_path / "fsdp")
    replicated = torchrun("train", options, tmp_path / "ddp")
    single = train(TrainConfig.from_options({**options, "batch_size": 8, "output": str(tmp_path / "one")}))
    expected = _trainable(single.model)
    for rank in range(2):
        _close(sharded[rank], expected)
        _close(replicated[rank], expected)
    report = json.loads((tmp_path / "fsdp" / "run" / "report.json").read_text())
    ddp_report = json.loads((tmp_path / "ddp" / "run" / "report.json").read_text())
    assert report["final_val_loss"] == pytest.approx(single.report["final_val_loss"], abs=1e-5)
    # Each rank holds half of every sharded tensor (the frozen base included) and of the AdamW state, as the
    # formula of docs/distributed.md's table predicts.
    frozen = ddp_report["rank_parameter_bytes"] - 4 * ddp_report["trainable_params"]
    for measured, sharded in ((report, True), (ddp_report, False)):
        predicted = rank_memory(frozen, measured["trainable_params"], world_size=2, sharded=sharded)
        assert measured["rank_parameter_bytes"] == pytest.approx(predicted.parameters, rel=0.01)
        assert measured["rank_gradient_bytes"] == pytest.approx(predicted.gradients, rel=0.01)
        assert measured["rank_optimizer_bytes"] == pytest.approx(predicted.optimizer, rel=0.01)
    # The best adapter is written once, whole, in PEFT's format, and PEFT loads it.
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir),
                                            tmp_path / "fsdp" / "run" / "adapter")
    saved = load_file(str(tmp_path / "fsdp" / "run" / "adapter" / "adapter_model.safetensors"))
    assert saved and all(v.shape == loaded.state_dict()[k.replace(".weight", ".default.weight")].shape
                         for k, v in saved.items())


@pytest.mark.slow
def test_sharded_dpo_equals_one_process(tmp_path, tiny_chat_model_dir, demo_subset) -> None:
    from lorakit.train.preference_data import bundled_preference_path

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(bundled_preference_path("train").read_text().splitlines()[:24]) + "\n")
    options = dict(model=str(tiny_chat_model_dir), data=str(pairs), max_steps=3, eval_every=10, batch_size=2,
                   learning_rate=5e-3, warmup_steps=0, seed=3, fsdp=True)
    sharded = torchrun("dpo", options, tmp_path / "fsdp")
    single = train_dpo(DPOConfig.from_options({**options, "fsdp": False, "batch_size": 4,
                                               "output": str(tmp_path / "one")}))
    for rank in range(2):
        _close(sharded[rank], _trainable(single.model))


@pytest.mark.slow
def test_dora_olora_patterns_and_checkpointing_shard_like_one_process(tmp_path, tiny_chat_model_dir,
                                                                      demo_subset) -> None:
    """DoRA magnitudes, an OLoRA init (made before sharding, saved portable), rank/alpha patterns, rsLoRA,
    modules_to_save and gradient checkpointing, all under --fsdp."""
    options = _sft_options(tiny_chat_model_dir, demo_subset, use_dora=True, init_lora_weights="olora",
                           use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4.0},
                           target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"],
                           gradient_checkpointing=True, max_steps=2)
    sharded = torchrun("train", {**options, "fsdp": True}, tmp_path / "fsdp")
    single = train(TrainConfig.from_options({**options, "batch_size": 8, "output": str(tmp_path / "one")}))
    _close(sharded[0], _trainable(single.model))
    ours = load_file(str(tmp_path / "fsdp" / "run" / "adapter" / "adapter_model.safetensors"))
    _close(ours, load_file(str(single.adapter_dir / "adapter_model.safetensors")))


@pytest.mark.slow
@pytest.mark.parametrize("variant", [{"method": "full", "compile": True}, {"load_in_4bit": True}],
                         ids=["full-compiled", "qlora"])
def test_full_fine_tuning_compile_and_4bit_bases_shard_like_one_process(
    variant, tmp_path, tiny_chat_model_dir, demo_subset
) -> None:
    """Full fine-tuning with --compile (every weight trainable and sharded, decoder layers compiled) and a
    bitsandbytes NF4 base (QLoRA: the packed 4-bit weights are sharded as they are stored)."""
    options = _sft_options(tiny_chat_model_dir, demo_subset, max_steps=2, **variant)
    sharded = torchrun("train", {**options, "fsdp": True}, tmp_path / "fsdp")
    single = train(TrainConfig.from_options({**options, "batch_size": 8, "output": str(tmp_path / "one")}))
    _close(sharded[0], _trainable(single.model), atol=1e-4 if "compile" in variant else 1e-5)


def test_kill_9_of_one_rank_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_chat_model_dir,
                                                                     demo_subset) -> None:
    options = {
        **_sft_options(tiny_chat_model_dir, demo_subset),
        "fsdp": True,
        "max_steps": 8,
        "eval_every": 4,
        "save_every": 2,
    }
    expected = torchrun("train", options, tmp_path / "whole")[0]
    out = tmp_path / "killed"
    launch, config = start("train", options, out, start_new_session=True)
    state = out / "run" / "checkpoint" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while not (state.is_file() and json.loads(state.read_text())["step"] >= 4):
        assert launch.poll() is None and time.monotonic() < deadline, "the run ended before its checkpoint"
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-f", f"dist_train.py train {config}"], capture_output=True, text=True)
    os.kill(int(workers.stdout.split()[-1]), signal.SIGKILL)  # one rank only; torchrun then stops the other
    launch.communicate(timeout=300)
    assert launch.returncode != 0
    resumed = torchrun("train", {**options, "resume": True}, out)
    _close(resumed[0], expected)
    steps = [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_two_nodes_train_like_one_process(tmp_path, tiny_chat_model_dir, demo_subset) -> None:
    options = {**_sft_options(tiny_chat_model_dir, demo_subset), "max_steps": 2}
    nodes = torchrun("train", {**options, "fsdp": True}, tmp_path / "nodes", nodes=2)
    single = train(TrainConfig.from_options({**options, "batch_size": 8, "output": str(tmp_path / "one")}))
    _close(nodes[1], _trainable(single.model))


@pytest.mark.parametrize(("options", "env", "message"), [
    ({"fsdp": True}, {}, "--fsdp: shards the model over the processes of a launch"),
])
def test_bad_combinations_fail_before_the_model_loads(tmp_path, options, env, message, monkeypatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(LorakitError, match=message):
        train(TrainConfig.from_options({**options, "model": str(tmp_path / "no-model-here"),
                                        "output": str(tmp_path / "run")}))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "dpo"])
def test_embedded_model_shards_like_data_parallel_and_one_process(
    command, tmp_path, default_model_dir
) -> None:
    """The embedded SmolLM2-135M-Instruct, 2 steps of SFT or DPO on the bundled data: sharded over 2
    processes,
    data parallel over 2 processes, and in one process with twice the batch.

    Sharded and data parallel runs compute the same sums in the same order: measured identical (difference
    0.0). One process pads its rows to other lengths and sums in another order: over 30 layers and two AdamW
    steps that moved one of 2.4 M SFT adapter entries by 1.8e-5 (median 3e-7), hence its looser bound.
    """
    options = dict(max_steps=2, eval_every=10, batch_size=2, warmup_steps=0, seed=3, lora_dropout=0.0)
    if command == "train":
        options.update(eval_limit=2, eval_max_new_tokens=4)
    sharded = torchrun(command, {**options, "fsdp": True}, tmp_path / "fsdp", timeout=1800)
    replicated = torchrun(command, options, tmp_path / "ddp", timeout=1800)
    run = train if command == "train" else train_dpo
    config_class = TrainConfig if command == "train" else DPOConfig
    single = run(config_class.from_options({**options, "batch_size": 4, "output": str(tmp_path / "one")}))
    _close(sharded[0], replicated[0], atol=1e-5)
    _close(sharded[0], _trainable(single.model), atol=5e-5)
