"""Shared pieces of the GPU benchmarks (benchmarks/gpu/run.sh): the model shapes, timing, memory, the matmul
rate that MFU is measured against, and JSON output.

Models are random-initialised from the shapes of the real configs (no weights can be fetched on the GPU
machine): Llama-3.2-1B and Llama-3.1-8B as published (hidden size, MLP width, layers, heads, KV heads,
vocabulary, tied embeddings), without their RoPE scaling, which changes no FLOP. `--tiny` swaps in a
2-layer, hidden-64 model so that the scripts run on a CPU in seconds (a dry run; no numbers to report).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=False,
)


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", action="store_true", help="Shrink every model and size (a CPU dry run).")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write.")
    parser.add_argument(
        "--budget", type=float, default=300.0, help="Seconds; later variants are skipped past it."
    )
    return parser.parse_args()


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def llama_config(shape: str, tiny: bool):
    """The transformers LlamaConfig of `shape` (or the tiny one)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        **(TINY if tiny else SHAPES[shape]),
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def llama(shape: str, tiny: bool, where: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A random-initialised Llama of `shape` (or the tiny one), built on `where` in `dtype`, with SDPA."""
    from transformers import AutoModelForCausalLM

    config = llama_config(shape, tiny)
    torch.manual_seed(seed)
    with torch.device(where):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def sync(where: torch.device) -> None:
    if where.type == "cuda":
        torch.cuda.synchronize(where)


def timed(fn: Callable[[], Any], where: torch.device, repeats: int) -> float:
    """Seconds per call of `fn`, over `repeats` calls after the caller's warm-up."""
    sync(where)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(where)
    return (time.perf_counter() - start) / repeats


def reset_memory(where: torch.device) -> None:
    """Free what is unreferenced and start counting peak memory from what is allocated now."""
    gc.collect()
    if where.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(where)


def peak_memory_gb(where: torch.device) -> float | None:
    """Peak allocated GPU memory since the last `reset_memory` (None on the CPU)."""
    return round(torch.cuda.max_memory_allocated(where) / 2**30, 3) if where.type == "cuda" else None


def matmul_tflops(where: torch.device, tiny: bool) -> dict[str, Any]:
    """The measured bf16 matmul rate (n³ with n = 8192; 256 with --tiny): the peak that MFU is relative to."""
    n = 256 if tiny else 8192
    a = torch.randn(n, n, device=where, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=where, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    seconds = timed(lambda: a @ b, where, 5 if tiny else 50)
    return {"n": n, "dtype": "bfloat16", "tflops": round(2 * n**3 / seconds / 1e12, 4)}


def environment(where: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "device": str(where),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if where.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(where)
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    return info


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write (temp file, then rename): a run cut off by its timeout leaves the last complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
