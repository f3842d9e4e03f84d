"""Merge adapters into a base checkpoint on disk, one tensor at a time (`lorakit merge`).

The base is read tensor by tensor (`TensorReader`: no memory map) and the output written shard by shard,
header first, block of rows by block of rows, so memory holds one input tensor and a few row blocks,
never a shard or the model: peak RSS above the start ≤ 2 × largest tensor + 64 MB (`lorakit.io.memory`),
recorded predicted vs measured in merge_report.json. A 100 GB model merges on a laptop. Each tensor is
`plan.merged_blocks` (float32 maths, one rounding). The output goes to a temporary directory renamed into
place at the end, after verification, so an interrupted or failed merge never leaves a directory that
looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import AdapterFileError, LorakitError
from lorakit.io.atomic import atomic_directory, atomic_write_text
from lorakit.io.checkpoint import (
    PICKLE_WEIGHTS,
    SAFE_WEIGHTS_INDEX_NAME,
    Checkpoint,
    OutputTensor,
    ShardedWriter,
    TensorReader,
    open_checkpoint,
    parse_size,
    shard_layout,
)
from lorakit.io.memory import MemoryBound, PeakMemory
from lorakit.merge.adapter_file import open_adapter
from lorakit.merge.plan import MergePlan, build_plan, describe_base, merged_blocks, target_dtype
from lorakit.merge.verify import (
    OutputCheck,
    TensorCheck,
    VerificationError,
    compare_outputs,
    verify_checkpoint,
)

REPORT_NAME = "merge_report.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Weights (converted, not copied) and files of other formats that transformers does not need.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


@dataclass(frozen=True)
class MergeReport:
    """What `merge_checkpoint` did; also written as merge_report.json in the output directory."""

    base: str
    adapters: list[str]
    weights: list[float]
    output: str
    dtype: str
    shards: int
    total_bytes: int
    tensors_merged: int
    tensors_replaced: int
    tensors_copied: int
    tensors_added: int
    untied_embeddings: bool
    peak_rss_bytes: int
    memory: MemoryBound
    seconds: float
    verify_seconds: float
    verification: TensorCheck | None
    outputs: OutputCheck | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge_checkpoint(
    base: str | os.PathLike | None,
    adapters: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    dtype: str = "auto",
    max_shard_size: int | str = "2GB",
    verify: bool = True,
    verify_outputs: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> MergeReport:
    """Write base + Σ wᵢ·ΔWᵢ as a new safetensors checkpoint in `output`, with config, generation config
    and tokenizer files, and return what was done.

    base: a local model directory, a .gguf file or "default"/None (see `lorakit.models.sources`).
    dtype: "auto" keeps each base tensor's dtype; float32/float16/bfloat16 converts floating tensors.
    verify: re-read the output and check every tensor against the expected value (≤ 1 ulp; untouched
    tensors bit-identical). verify_outputs: also compare logits of the merged model with base + adapters
    loaded in memory (needs memory for two models).

    Weights scale each adapter's LoRA update (and lora_bias); tensors an adapter saves whole (modules_to_save,
    trained biases) replace the base's as loading would. DoRA adapters take weight 1 only.
    """
    start = time.perf_counter()
    memory = PeakMemory()
    paths, weights = _adapters_and_weights(adapters, weights)
    shard_bytes, output = _check_output(dtype, max_shard_size, Path(output), overwrite)
    base_dir = _resolve_base(base)
    config = _read_config(base_dir)
    checkpoint = open_checkpoint(base_dir)
    target = DTYPES.get(dtype)
    with ExitStack() as stack:
        opened = [stack.enter_context(open_adapter(path)) for path in paths]
        plan = build_plan(checkpoint, describe_base(base_dir, config), opened, weights)
        with atomic_directory(output, overwrite=overwrite) as tmp:
            files = _write_tensors(tmp, plan, target, shard_bytes, progress)
            _copy_support_files(base_dir, tmp)
            _write_config(tmp / "config.json", config, target, plan.untie_embeddings)
            check, verify_seconds = _verify(tmp, plan, target, verify, progress)
            bound = memory.bound(_largest_tensor(plan, target))
            if check is not None and not check.passed:
                raise VerificationError(f"{output}: verification failed, nothing written: "
                                        f"{check.failures[0]}")
            directories = [a.directory for a in opened]
            outputs = compare_outputs(base_dir, directories, weights, tmp) if verify_outputs else None
            report = MergeReport(
                base=str(base_dir), adapters=[str(d) for d in directories], weights=weights,
                output=str(output),
                dtype=dtype if target is not None else _dtype_names(checkpoint), **_file_counts(tmp, files),
                **_tensor_counts(plan), untied_embeddings=plan.untie_embeddings,
                peak_rss_bytes=bound.peak_rss_bytes, memory=bound,
                seconds=round(time.perf_counter() - start, 3), verify_seconds=verify_seconds,
                verification=check, outputs=outputs,
            )
            atomic_write_text(tmp / REPORT_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _check_output(dtype: str, max_shard_size: int | str, output: Path, overwrite: bool) -> tuple[int, Path]:
    """(shard size in bytes, output directory), after checking the dtype and that output may be written."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: already exists; pass --overwrite (overwrite=True) to replace it")
    return shard_bytes, output


def _verify(directory: Path, plan: MergePlan, dtype: torch.dtype | None, verify: bool,
            progress: bool) -> tuple[TensorCheck | None, float]:
    """The verification of what was written (None when not asked for) and the seconds it took."""
    start = time.perf_counter()
    check = verify_checkpoint(directory, plan, dtype, progress=progress) if verify else None
    return check, round(time.perf_counter() - start, 3)


def _adapters_and_weights(adapters: str | os.PathLike | Sequence[str | os.PathLike],
                          weights: Sequence[float] | None) -> tuple[list[str | os.PathLike], list[float]]:
    """The adapter paths as a list and one weight per adapter (1.0 each by default)."""
    paths = [adapters] if isinstance(adapters, (str, os.PathLike)) else list(adapters)
    if not paths:
        raise ValueError("merge: give at least one adapter")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise ValueError(f"merge: {len(paths)} adapter(s) but {len(weights)} weight(s)")
    return paths, weights


def _resolve_base(base: str | os.PathLike | None) -> Path:
    # Imported here: model sources pull in the hub client and GGUF conversion, needed only for such bases.
    from lorakit.models.sources import resolve_model_source

    return resolve_model_source(base)


def _read_config(base_dir: Path) -> dict[str, Any]:
    file = base_dir / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterFileError(f"{file}: not found; expected a transformers model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{file}: expected a JSON object")
    if config.get("quantization_config"):
        quantization = config["quantization_config"]
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        raise LorakitError(f"{file}: the base is quantized ({method}); merging into quantized checkpoints is "
                           "not supported yet, merge into the unquantized model")
    return config


def _write_tensors(directory: Path, plan: MergePlan, dtype: torch.dtype | None, shard_bytes: int,
                   progress: bool) -> list[str]:
    """Compute and write every output tensor in checkpoint order; returns the files written."""
    from tqdm.auto import tqdm

    outputs = list(plan.outputs())
    targets = [(name, info, target_dtype(info.dtype, dtype)) for name, info in outputs]
    layout = shard_layout([OutputTensor(n, d, i.shape) for n, i, d in targets], shard_bytes)
    writer = ShardedWriter(directory, layout)
    bar = tqdm(total=sum(i.nbytes for _, i, _ in targets), unit="B", unit_scale=True, desc="merging",
               disable=not progress)
    try:
        with TensorReader(plan.checkpoint.directory, reuse=True) as reader:
            for name, info, target in targets:
                base = reader.get(info.file, info.name)
                writer.write(name, merged_blocks(base, plan.tensors.get(name), plan.adapters, target))
                bar.update(info.nbytes)
        return writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()


def _largest_tensor(plan: MergePlan, dtype: torch.dtype | None) -> int:
    """Bytes of the largest tensor read or written (a dtype conversion can make the output the larger)."""
    sizes = [max(info.nbytes, info.nbytes // info.dtype.itemsize * target_dtype(info.dtype, dtype).itemsize)
             for _, info in plan.outputs()]
    return max(sizes, default=0)


def _dtype_names(checkpoint: Checkpoint) -> str:
    """The base's floating dtypes, which "auto" keeps (e.g. "bfloat16", or "bfloat16,float32" if mixed)."""
    floating = {str(i.dtype).removeprefix("torch.") for i in checkpoint.tensors.values()
                if i.dtype.is_floating_point}
    return ",".join(sorted(floating)) or "none"


def _file_counts(directory: Path, files: list[str]) -> dict[str, int]:
    return {
        "shards": sum(f.endswith(".safetensors") for f in files),
        "total_bytes": sum((directory / f).stat().st_size for f in files),
    }


def _tensor_counts(plan: MergePlan) -> dict[str, int]:
    changed = [p for p in plan.tensors.values() if p.ops]
    return {
        "tensors_merged": sum(p.merged for p in changed),
        "tensors_replaced": sum(not p.merged for p in changed),
        "tensors_copied": sum(1 for name, _ in plan.outputs()
                              if not (name in plan.tensors and plan.tensors[name].ops)),
        "tensors_added": sum(name not in plan.checkpoint.tensors for name in plan.tensors),
    }


def _copy_support_files(base_dir: Path, output: Path) -> None:
    """Copy what transformers needs besides the weights: generation config, tokenizer, chat template..."""
    for path in sorted(base_dir.iterdir()):
        name = path.name
        if not path.is_file() or name.startswith(".") or name.endswith(_WEIGHT_SUFFIXES):
            continue
        if name in (REPORT_NAME, "config.json", SAFE_WEIGHTS_INDEX_NAME, *PICKLE_WEIGHTS):
            continue
        shutil.copy2(path, output / name)


def _write_config(file: Path, config: dict[str, Any], dtype: torch.dtype | None, untie: bool) -> None:
    config = dict(config)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        # transformers 5 writes "dtype"; older versions (and checkpoints) "torch_dtype": keep both in step.
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict) and config["text_config"].get("tie_word_embeddings"):
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    atomic_write_text(file, json.dumps(config, indent=2) + "\n")
