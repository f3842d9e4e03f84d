"""Faults: a run killed with SIGKILL resumes to the same adapter; a kill during a checkpoint save or a merge
never leaves a corrupt or complete-looking directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_llama

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _spawn(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"process ended early: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def _checkpoint_step(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError):
        return -1


def test_kill_9_during_training_then_resume_matches_an_uninterrupted_run(
    tmp_path, tiny_chat_model_dir, demo_subset
) -> None:
    common = [
        "-m",
        "lorakit",
        "train",
        "--model",
        str(tiny_chat_model_dir),
        "--data",
        str(demo_subset["train"]),
        "--max-steps",
        "60",
        "--batch-size",
        "2",
        "--save-every",
        "4",
        "--eval-every",
        "1000",
        "--learning-rate",
        "3e-3",
        "--lora-dropout",
        "0.1",
        "--seed",
        "5",
    ]
    reference = _spawn([*common, "--output", str(tmp_path / "reference")])
    killed = _spawn([*common, "--output", str(tmp_path / "killed")])
    _wait_for(lambda: _checkpoint_step(tmp_path / "killed") >= 12, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]
    assert not (tmp_path / "killed" / "adapter").exists()

    resumed = _spawn([*common, "--output", str(tmp_path / "killed"), "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
    expected = load_file(str(tmp_path / "reference" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert worst <= 1e-6, worst
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert steps == list(range(1, 61))


SAVE_LOOP = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from transformers import AutoModelForCausalLM
    import lorakit
    from lorakit.train.checkpoint import Progress, save_checkpoint

    base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=8, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.fill_(step)
        save_checkpoint(Path(sys.argv[2]), model, optimizer, scheduler, Progress(step=step))
        print(step, flush=True)
""")


@pytest.mark.parametrize("delay", [0.05, 0.13, 0.31, 0.57])
def test_kill_9_during_checkpoint_save_leaves_the_previous_or_the_new_checkpoint(
    delay, tmp_path, tiny_chat_model_dir
) -> None:
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.train.checkpoint import load_checkpoint

    script = tmp_path / "save_loop.py"
    script.write_text(SAVE_LOOP)
    target = tmp_path / "checkpoint"
    process = _spawn([str(script), str(tiny_chat_model_dir), str(target)])
    _wait_for(lambda: (target / "trainer_state.json").exists(), process)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()

    model = lorakit.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir),
        lorakit.LoraConfig(r=8, target_modules="all-linear"),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    progress, _ = load_checkpoint(target, model, optimizer, scheduler)
    values = {p.flatten()[0].item() for p in model.parameters() if p.requires_grad}
    assert values == {float(progress.step)}, "weights and trainer state come from the same save"


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.4])
def test_kill_9_during_merge_leaves_no_output_directory(delay, tmp_path) -> None:
    import lorakit

    # Large enough (~25 MB) that the merge is still writing when it is killed.
    base = tiny_llama(
        hidden=256,
        perturb=False,
        vocab_size=8192,
        num_hidden_layers=6,
        max_position_embeddings=2048,
        pad_token_id=None,
    )
    base.save_pretrained(tmp_path / "base", max_shard_size="4MB")
    lorakit.get_peft_model(
        base, lorakit.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)
    ).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    process = _spawn(
        [
            "-m",
            "lorakit",
            "merge",
            "--model",
            str(tmp_path / "base"),
            "--adapter",
            str(tmp_path / "adapter"),
            "--output",
            str(out),
            "--max-shard-size",
            "2MB",
        ]
    )
    # Kill once the merge has started writing (its temporary output directory exists), at varying points.
    _wait_for(lambda: any(p.name.startswith(".merged") for p in tmp_path.iterdir()), process)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if out.exists():  # the rename happened before the kill: then the output is complete and verified
        assert json.loads((out / "merge_report.json").read_text())["verification"]["passed"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")]
    assert all(name.endswith(".tmp") for name in leftovers), "only hidden temporary directories may remain"
    assert out.exists() or leftovers, "the kill must have interrupted a merge in progress"
