"""Random checkpoints and LoRA adapters of a real architecture's shape, written tensor by tensor.

For scale tests and benchmarks (an 8B-shaped checkpoint on a machine with less RAM than that): the
tensor names, shapes and order are those of the transformers model built from `config` on the meta
device (no memory), the values N(0, 0.02²) (norm weights 1): each block of rows is a slice, at a seeded
random offset, of one pool of 2²⁴ seeded normals (drawing 8 billion fresh normals would take longer than
the disk), streamed to disk with `ShardedWriter`, so writing needs memory for one block, not a tensor.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from lorakit.io.atomic import atomic_write_text
from lorakit.io.checkpoint import OutputTensor, ShardedWriter, shard_layout

_BLOCK_ELEMENTS = 2**23
_POOL_ELEMENTS = 2**24
_STD = 0.02


def meta_parameters(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored parameter of the causal LM `config` describes, in model order
    (tied parameters once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def write_random_checkpoint(directory: str | Path, config: Any, dtype: torch.dtype, max_shard_size: int,
                            seed: int = 0) -> int:
    """Write config.json and random weights in `dtype` as safetensors shards of ≤ `max_shard_size` bytes
    (a larger tensor gets its own); returns the bytes of weights written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.architectures = getattr(config, "architectures", None) or ["LlamaForCausalLM"]
    params = meta_parameters(config)
    tensors = [OutputTensor(name, dtype, shape) for name, shape in params]
    writer = ShardedWriter(directory, shard_layout(tensors, max_shard_size))
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL_ELEMENTS, generator=generator).mul_(_STD)
    try:
        for tensor in tensors:
            writer.write(tensor.name, _random_blocks(tensor, pool, generator))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    atomic_write_text(directory / "config.json", config.to_json_string())
    return sum(t.nbytes for t in tensors)


def _random_blocks(tensor: OutputTensor, pool: torch.Tensor, generator: torch.Generator) -> Any:
    if len(tensor.shape) == 1 and "norm" in tensor.name:
        yield torch.ones(tensor.shape, dtype=tensor.dtype)
        return
    if not tensor.shape:
        yield pool[0].to(tensor.dtype)
        return
    row = max(1, math.prod(tensor.shape[1:]))
    step = max(1, _BLOCK_ELEMENTS // row)
    for start in range(0, tensor.shape[0], step):
        rows = min(step, tensor.shape[0] - start)
        count = rows * row
        if count > pool.numel():  # rows wider than the pool: fresh normals
            yield torch.randn((rows, *tensor.shape[1:]), generator=generator).mul_(_STD).to(tensor.dtype)
            continue
        offset = int(torch.randint(0, pool.numel() - count + 1, (), generator=generator))
        yield pool[offset:offset + count].view(rows, *tensor.shape[1:]).to(tensor.dtype)


def write_random_adapter(directory: str | Path, config: Any, rank: int, target_modules: list[str],
                         dtype: torch.dtype = torch.float32, seed: int = 1) -> int:
    """A PEFT-format LoRA adapter (adapter_config.json + adapter_model.safetensors) for every linear
    weight whose module name ends with one of `target_modules`, with random A and B (B nonzero, so the
    merge changes every adapted weight); lora_alpha = 2·rank. Returns the number of adapted modules."""
    from lorakit.config import LoraConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors: list[tuple[OutputTensor, torch.Tensor]] = []
    for name, shape in meta_parameters(config):
        module = name.removesuffix(".weight")
        if len(shape) != 2 or module.rsplit(".", 1)[-1] not in target_modules:
            continue
        key = f"base_model.model.{module}"
        a = torch.randn((rank, shape[1]), generator=generator).div_(math.sqrt(shape[1])).to(dtype)
        b = torch.randn((shape[0], rank), generator=generator).mul_(_STD).to(dtype)
        tensors += [(OutputTensor(f"{key}.lora_A.weight", dtype, a.shape), a),
                    (OutputTensor(f"{key}.lora_B.weight", dtype, b.shape), b)]
    layout = shard_layout([t for t, _ in tensors], max_shard_size=2**62)
    writer = ShardedWriter(directory, layout)
    for planned, value in tensors:
        writer.write(planned.name, value)
    (directory / writer.close()[0]).rename(directory / "adapter_model.safetensors")
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules)).save_pretrained(directory)
    return len(tensors) // 2


def checkpoint_summary(directory: str | Path) -> dict[str, Any]:
    """Files and bytes of a written checkpoint, for benchmark records."""
    directory = Path(directory)
    shards = sorted(directory.glob("*.safetensors"))
    return {"shards": len(shards), "bytes": sum(p.stat().st_size for p in shards),
            "config": json.loads((directory / "config.json").read_text())}
