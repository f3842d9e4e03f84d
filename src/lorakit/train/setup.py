"""The environment of a training run: processes, the run directory and the base model.

Shared by every objective through the Trainer; nothing here knows what is being trained.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from lorakit.errors import LorakitError
from lorakit.train.config import TuningConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

def make_accelerator(log_with: Sequence[Any] = (), logging_dir: Path | None = None,
                     cpu: bool = False) -> Accelerator:
    """The run's Accelerator: one process, or all the processes of an `accelerate launch`/`torchrun` launch;
    `log_with` and `logging_dir` are its experiment trackers and where they write (`train.tracking`).

    accelerate makes a multi-process launch distributed on the CPU (gloo) only when told to use the CPU
    (`Accelerator(cpu=True)` or ACCELERATE_USE_CPU); under `torchrun` on a machine without a GPU each
    process would instead train alone and all of them would write the same output directory. So a launch
    of several processes with no device to spread over asks for the CPU, and one that still does not come
    up with all its processes is refused.

    accelerate's own FSDP, DeepSpeed and Megatron plugins are refused: lorakit shards with FSDP2 itself
    (`--fsdp`, train/fsdp.py) and saves what it shards; DeepSpeed needs CUDA and is not supported.

    `cpu` (--device cpu) makes a launch of several processes run on the CPU even where there are GPUs. The
    Trainer places the model itself (`training_device`), so accelerate's device placement is off.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(cpu=world_size > 1 and (cpu or not _device_for_data_parallel()),
                              device_placement=False, log_with=list(log_with) or None,
                              project_dir=logging_dir)
    # (WORLD_SIZE unset with several processes is accelerate's own MPI launch of CPU processes: fine.)
    if world_size > 1 and accelerator.num_processes != world_size:
        raise LorakitError(
            f"launched as {world_size} processes, but accelerate set up {accelerator.num_processes}; "
            "start lorakit with `accelerate launch` or `torchrun`"
        )
    sharded = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    if accelerator.distributed_type in sharded:
        raise LorakitError(
            f"accelerate is configured for {accelerator.distributed_type.value}, which lorakit "
            "does not use; launch plain processes and pass --fsdp to shard with FSDP2 "
            "(DeepSpeed is not supported; see docs/distributed.md)"
        )
    return accelerator


def training_device(config: TuningConfig, accelerator: Accelerator) -> torch.device:
    """Where this process trains: --device auto is the device accelerate chose (a GPU when there is one;
    also Apple's MPS or an XPU), cpu/cuda/cuda:N what they say; under a launch of several processes the
    device accelerate gave each (its own GPU, or the CPU with --device cpu), so --device cuda:N is refused."""
    from lorakit.device import resolve_device

    if config.device == "auto":
        return accelerator.device
    if accelerator.num_processes == 1:
        return resolve_device(config.device)
    if config.device not in ("auto", "cpu", "cuda"):
        raise LorakitError(f"--device {config.device}: under a launch of {accelerator.num_processes} "
                           "processes each process takes its own GPU; use --device auto (or set "
                           "CUDA_VISIBLE_DEVICES)")
    return accelerator.device


def _device_for_data_parallel() -> bool:
    """Whether this machine has a device that accelerate spreads processes over (CUDA, XPU, ...)."""
    api = getattr(torch, "accelerator", None)  # torch >= 2.6
    if api is None:
        return torch.cuda.is_available()
    device = api.current_accelerator() if api.is_available() else None
    # Apple's MPS has no multi-process backend in accelerate: several processes there train on the CPU.
    return device is not None and device.type != "mps"


def prepare_output(config: TuningConfig, config_file: str) -> None:
    """Make the run directory and save the resolved options in it as `config_file` (YAML, flat option
    names: `lorakit <command> --config` reads it back).

    Refuses to mix runs: an output dir holding another run needs --overwrite or --resume.
    """
    out = config.output_dir
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--output {out}: exists and is not a directory")
    occupied = out.is_dir() and any(out.iterdir())
    if config.resume:
        if not (out / "checkpoint").is_dir():
            raise LorakitError(f"--resume: {out} holds no checkpoint to resume from")
    elif occupied:
        if not config.overwrite:
            raise LorakitError(
                f"--output {out}: holds another run; pass --overwrite to replace it or --resume "
                "to continue it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / config_file).write_text(yaml.safe_dump(config.to_options(), sort_keys=False))


def load_base_model(config: TuningConfig, device: torch.device, dtype: torch.dtype = torch.float32,
                    move: bool = True) -> tuple[torch.nn.Module, str]:
    """(the base model in `dtype` with SDPA attention, quantized if asked and prepared for training, where it
    was loaded from); moved to `device` unless `move` is False (it stays where it was loaded: the CPU, for
    FSDP2 to shard). A quantized base is placed on `device` as it loads and computes in `dtype` if that is
    half precision."""
    from lorakit.models.sources import load_causal_lm, resolve_model_source

    kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    quantized = config.load_in_8bit or config.load_in_4bit
    if quantized:
        from lorakit.device import HALF_DTYPES
        from lorakit.quant import quantization_config

        compute = dtype if dtype in HALF_DTYPES else None
        kwargs["quantization_config"] = quantization_config(
            load_in_8bit=config.load_in_8bit, load_in_4bit=config.load_in_4bit, compute_dtype=compute)
        if device.type == "cuda":
            kwargs["device_map"] = {"": device}
    model = load_causal_lm(config.model, dtype=dtype, trust_remote_code=config.trust_remote_code, **kwargs)
    if config.liger:
        from lorakit.train.kernels import apply_liger

        apply_liger(model, device)
    if quantized:
        from lorakit.quant import prepare_for_kbit_training

        prepare_for_kbit_training(model, gradient_checkpointing=config.gradient_checkpointing)
    elif move:
        model.to(device)
    model.config.use_cache = False
    return model, str(resolve_model_source(config.model))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a PeftModel counts 4-bit packed weights unpacked, as PEFT does."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
