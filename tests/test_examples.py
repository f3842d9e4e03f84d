"""The files in examples/ run as documented (on the tiny model, with few steps)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_yaml_config_trains_as_its_keys_say(tmp_path: Path, tiny_chat_model_dir: Path) -> None:
    """`lorakit train --config examples/train_dates.yaml`, on the tiny model for 2 steps (flags override
    it)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorakit",
            "train",
            "--config",
            str(EXAMPLES / "train_dates.yaml"),
            "--model",
            str(tiny_chat_model_dir),
            "--max-steps",
            "2",
            "--eval-limit",
            "2",
            "--output",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    options = yaml.safe_load((EXAMPLES / "train_dates.yaml").read_text())
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    # OLoRA adapters are saved for the untouched base: twice the rank, alpha scaled to keep alpha / r.
    assert options["init_lora_weights"] == "olora"
    assert (adapter["r"], adapter["lora_alpha"]) == (2 * options["r"], 2 * options["lora_alpha"])
    assert sorted(adapter["target_modules"]) == sorted(options["target_modules"])
    assert adapter["lora_dropout"] == options["lora_dropout"]


def test_api_quickstart_trains_saves_reloads_and_merges(tmp_path: Path, tiny_chat_model_dir: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "api_quickstart.py"),
            "--model",
            str(tiny_chat_model_dir),
            "--steps",
            "5",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    losses = [float(line.rsplit(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.slow
def test_sft_then_dpo_script(tmp_path: Path, tiny_chat_model_dir: Path) -> None:
    env = {**os.environ, "MODEL": str(tiny_chat_model_dir), "STEPS": "2", "OUT": str(tmp_path),
           "LORAKIT": f"{sys.executable} -m lorakit"}
    done = subprocess.run(
        ["bash", str(EXAMPLES / "sft_then_dpo.sh")], capture_output=True, text=True, timeout=900, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "merge_report.json").is_file()


def test_serve_client_talks_to_lorakit_serve(tmp_path: Path, tiny_chat_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import lorakit

    torch.manual_seed(0)
    adapter = lorakit.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir),
        lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    adapter.save_pretrained(tmp_path / "dates")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorakit",
            "serve",
            "--model",
            str(tiny_chat_model_dir),
            "--port",
            str(port),
            "--adapter",
            f"dates={tmp_path / 'dates'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            done = subprocess.run([sys.executable, str(EXAMPLES / "serve_client.py"), "--url", f"http://127.0.0.1:{port}/v1"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
            time.sleep(1)
        assert done.returncode == 0, done.stderr[-2000:]
        out = done.stdout  # the tiny random model's replies may hold newlines: look for the labels
        assert out.splitlines()[0] == f"served models: {tiny_chat_model_dir.name}, dates"
        assert re.search(r"^\s*base: ", out, re.M) and re.search(r"^\s*dates: ", out, re.M)
        assert "dates (streamed): " in out
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
