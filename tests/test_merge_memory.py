"""Streaming merge and GGUF export memory (issue 23): peak RSS above the `import torch, transformers`
baseline of a fresh process is at most 2 × the largest tensor + 64 MB, with 100 MB shards and with one
file, and merge_report.json states that bound next to the measured peak.

The checkpoint is a random 426 MB float32 Llama (24 layers of hidden 256 and MLP 4096, vocabulary 49,152
with SmolLM2's tokenizer for the export); its largest tensors are the untied embedding and head, 50.3 MB
each, so the bound (165 MB) is 0.39× the checkpoint: holding a shard, an output shard or the model
would break it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from lorakit.io.checkpoint import open_checkpoint
from lorakit.io.synthetic import write_random_adapter, write_random_checkpoint
from lorakit.models.sources import resolve_model_source

VOCAB, HIDDEN, INTERMEDIATE, LAYERS = 49152, 256, 4096, 24
LARGEST = VOCAB * HIDDEN * 4
BOUND = 2 * LARGEST + 64 * 2**20
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CHILD = """
import json, sys, torch, transformers
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
baseline = status()["VmRSS"]
base, adapter, output, job = sys.argv[1:]
if job == "merge":
    from lorakit.merge.streaming import merge_checkpoint
    report = merge_checkpoint(base, adapter, output, max_shard_size="100MB")
    extra = {"passed": report.verification.passed, "merged": report.tensors_merged}
else:
    from lorakit.export.model import export_gguf
    report = export_gguf(base, output, [adapter], type="f16")
    extra = {"tensors": report.tensors}
print(json.dumps({"baseline": baseline, **status(), "memory": report.memory.__dict__, **extra}))
"""


def _base(directory: Path, shard_bytes: int) -> Path:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
                         tie_word_embeddings=False)
    size = write_random_checkpoint(directory, config, torch.float32, shard_bytes)
    assert 400e6 < size < 450e6
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(resolve_model_source(None) / name, directory / name)
    return directory


def _run(job: str, base: Path, adapter: Path, output: Path) -> dict:
    argv = [sys.executable, "-c", textwrap.dedent(CHILD), str(base), str(adapter), str(output), job]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("shards", ["100MB", "single"])
def test_merge_and_export_peak_is_two_largest_tensors(tmp_path: Path, shards: str) -> None:
    shard_bytes = 100 * 10**6 if shards == "100MB" else 2**40
    base = _base(tmp_path / "base", shard_bytes)
    files = list(base.glob("*.safetensors"))
    assert len(files) == (1 if shards == "single" else 5)
    adapter = tmp_path / "adapter"
    assert write_random_adapter(adapter, LlamaConfig.from_pretrained(base), 16, LINEAR) == 7 * LAYERS

    merged = _run("merge", base, adapter, tmp_path / "merged")
    assert merged["passed"] and merged["merged"] == 7 * LAYERS
    measured = merged["VmHWM"] - merged["baseline"]
    print(f"{shards}: merge peak {measured / 2**20:.0f} MiB above import baseline "
          f"(bound {BOUND / 2**20:.0f})")
    assert measured <= BOUND
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["memory"]["largest_tensor_bytes"] == LARGEST
    assert report["memory"]["predicted_peak_above_start_bytes"] == BOUND
    assert 0 < report["memory"]["measured_peak_above_start_bytes"] <= measured
    assert report["memory"]["within_bound"]
    assert open_checkpoint(tmp_path / "merged").total_bytes == open_checkpoint(base).total_bytes

    exported = _run("export", base, adapter, tmp_path / "model.gguf")
    measured = exported["VmHWM"] - exported["baseline"]
    print(f"{shards}: export peak {measured / 2**20:.0f} MiB above import baseline")
    assert exported["tensors"] == 2 + 1 + 9 * LAYERS
    assert measured <= BOUND and exported["memory"]["within_bound"]


def test_export_streams_a_tensor_as_large_as_its_input(tmp_path: Path) -> None:
    """bfloat16 in, f16 out: the encoded embedding is as large as the stored one, so holding it whole
    beside the input (plus a block's temporaries) would pass 2 × largest + 64 MB; rows are written as they
    are encoded instead."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=1024, intermediate_size=1024, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    base = tmp_path / "base"
    write_random_checkpoint(base, config, torch.bfloat16, 2**40)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(resolve_model_source(None) / name, base / name)
    write_random_adapter(tmp_path / "adapter", config, 16, ["q_proj", "down_proj"])
    largest = VOCAB * 1024 * 2
    exported = _run("export", base, tmp_path / "adapter", tmp_path / "model.gguf")
    measured = exported["VmHWM"] - exported["baseline"]
    assert exported["memory"]["largest_tensor_bytes"] == largest
    assert measured <= 2 * largest + 64 * 2**20 and exported["memory"]["within_bound"]
