"""Supervised fine-tuning (LoRA or full) — the API behind `lorakit train`.

    from lorakit.train import TrainConfig, train
    result = train(TrainConfig(output="runs/dates"))

Order of work: validate the options and the data (bad data fails before any model is loaded), load the
model, add the adapter, run the loop (progress bar, validation, best adapter, checkpoints), then write
the adapter, metrics, loss curve and report, and score exact match of base vs adapter when the test
data has reference answers.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.model import PeftModel
from lorakit.train.compile import compiled_decoder_layers
from lorakit.train.config import TrainConfig, TuningConfig
from lorakit.train.data import (
    build_datasets,
    bundled_dataset_path,
    load_records,
    prompt_messages,
    reference_answer,
)
from lorakit.train.evaluate import score_exact_match, validation_loss
from lorakit.train.loop import LoopSettings, TrainingLoop
from lorakit.train.loss import CausalLMLoss
from lorakit.train.report import peak_memory_mb, plot_loss_curve, print_report, write_report
from lorakit.train.tokenize import collate

if TYPE_CHECKING:
    from accelerate import Accelerator

CONFIG_FILE = "train_config.yaml"


@dataclass
class TrainResult:
    """Where a run's outputs went, its report, and the trained model itself.

    `model` is the model in memory as the last optimizer step left it (the PeftModel, or the transformers
    model with --method full), identical on every process of a distributed run; the adapter kept in
    `adapter_dir` is the best one by validation loss, which may be an earlier step's.
    """

    output_dir: Path
    adapter_dir: Path
    report: dict[str, Any]
    model: torch.nn.Module


def resolve_data_paths(config: TrainConfig) -> tuple[str, str | None, str | None]:
    """(train, validation, test) files; with no --data, the bundled demo splits."""
    if config.data is None:
        return (str(bundled_dataset_path("train")), config.validation_data or str(bundled_dataset_path("validation")),
                config.test_data or str(bundled_dataset_path("test")))
    return config.data, config.validation_data, config.test_data


def prepare_output(config: TuningConfig, config_file: str) -> None:
    """Make the run directory and save the resolved options in it as `config_file` (YAML).

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
            raise LorakitError(f"--output {out}: holds another run; pass --overwrite to replace it or --resume to continue it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / config_file).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def lora_config_for(config: TuningConfig, model_name: str | None) -> LoraConfig:
    targets: list[str] | str = config.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=targets,
        init_lora_weights=config.init_lora_weights, use_rslora=config.use_rslora, use_dora=config.use_dora,
        task_type="CAUSAL_LM", base_model_name_or_path=model_name,
    )


def load_model_for_training(config: TuningConfig, device: torch.device):
    """The base model (quantized if asked), prepared for training."""
    from lorakit.models.sources import load_causal_lm, resolve_model_source

    kwargs: dict[str, Any] = {}
    if config.load_in_8bit or config.load_in_4bit:
        from lorakit.quant import quantization_config

        kwargs["quantization_config"] = quantization_config(load_in_8bit=config.load_in_8bit, load_in_4bit=config.load_in_4bit)
    model = load_causal_lm(config.model, trust_remote_code=config.trust_remote_code, **kwargs)
    if not kwargs:
        model.to(device)
    else:
        from lorakit.quant import prepare_for_kbit_training

        prepare_for_kbit_training(model, gradient_checkpointing=config.gradient_checkpointing)
    model.config.use_cache = False
    return model, str(resolve_model_source(config.model))


def make_accelerator() -> Accelerator:
    """The run's Accelerator: one process, or all the processes of an `accelerate launch`/`torchrun` launch.

    accelerate makes a multi-process launch distributed on the CPU (gloo) only when told to use the CPU
    (`Accelerator(cpu=True)` or ACCELERATE_USE_CPU); under `torchrun` on a machine without a GPU each
    process would instead train alone and all of them would write the same output directory. So a launch
    of several processes with no device to spread over asks for the CPU, and one that still does not come
    up with all its processes is refused.

    Only data parallelism (DDP) is supported: the adapter, the best adapter and the checkpoints are saved
    from the main process's own copy of the weights and optimizer state, which FSDP and DeepSpeed shard
    across processes, so an accelerate config that asks for those is refused rather than saving a part.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(cpu=world_size > 1 and not _device_for_data_parallel())
    # (WORLD_SIZE unset with several processes is accelerate's own MPI launch of CPU processes: fine.)
    if world_size > 1 and accelerator.num_processes != world_size:
        raise LorakitError(f"launched as {world_size} processes, but accelerate set up {accelerator.num_processes}; "
                           "start lorakit train with `accelerate launch` or `torchrun`")
    sharded = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    if accelerator.distributed_type in sharded:
        raise LorakitError(f"accelerate is configured for {accelerator.distributed_type.value}, which lorakit train does "
                           "not support yet; use plain data parallelism (see docs/distributed.md)")
    return accelerator


def _device_for_data_parallel() -> bool:
    """Whether this machine has a device that accelerate spreads processes over (CUDA, XPU, ...)."""
    api = getattr(torch, "accelerator", None)  # torch >= 2.6
    if api is None:
        return torch.cuda.is_available()
    device = api.current_accelerator() if api.is_available() else None
    # Apple's MPS has no multi-process backend in accelerate: several processes there train on the CPU.
    return device is not None and device.type != "mps"


def train(config: TrainConfig) -> TrainResult:
    """Run one fine-tuning job as described by `config`; returns where its outputs went, the report and
    the trained model. Launched by `accelerate launch` or `torchrun`, every process calls this (see
    docs/distributed.md)."""
    from accelerate.utils import set_seed

    from lorakit.models.sources import load_tokenizer

    accelerator = make_accelerator()
    main = accelerator.is_main_process
    train_path, val_path, test_path = resolve_data_paths(config)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    train_examples, val_examples, data_stats = build_datasets(
        train_path, tokenizer, validation_path=val_path, validation_fraction=config.validation_fraction, seed=config.seed,
        max_seq_len=config.max_seq_len, train_on_prompt=config.train_on_prompt, packing=config.packing,
    )
    test_records = load_records(test_path) if test_path else []
    if main:
        prepare_output(config, CONFIG_FILE)
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    started = time.perf_counter()

    model, model_dir = load_model_for_training(config, accelerator.device)
    if config.method == "lora":
        from lorakit import get_peft_model

        trained: torch.nn.Module = get_peft_model(model, lora_config_for(config, model_dir))
    else:
        for param in model.parameters():
            param.requires_grad_(True)
        trained = model
    if config.gradient_checkpointing:
        trained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = _count_parameters(trained)

    loss_fn = CausalLMLoss(trained)
    pad_id = tokenizer.pad_token_id
    out = config.output_dir
    best_dir = out / ("adapter" if config.method == "lora" else "model")

    def save_best() -> None:
        if main:
            _save_trained(trained, tokenizer, best_dir)

    def evaluate() -> float | None:
        if not val_examples:
            return None
        shard = val_examples[accelerator.process_index::accelerator.num_processes]
        with torch.compiler.set_stance("force_eager"):  # no-grad passes would compile graphs of their own
            return validation_loss(loss_fn, shard, config.batch_size, pad_id, accelerator.device,
                                   reduce=lambda t: accelerator.reduce(t, reduction="sum"))

    settings = LoopSettings.from_config(config)
    loop = TrainingLoop(
        accelerator=accelerator, model=trained, loss_fn=loss_fn, train_examples=train_examples,
        collate=lambda batch: collate(batch, pad_id), settings=settings, output_dir=out, evaluate=evaluate,
        save_best=save_best, describe=f"{config.method} r={config.r}" if config.method == "lora" else "full fine-tune",
    )
    progress = loop.resume() if config.resume else None
    # Before any update the adapter is the identity (OLoRA/PiSSA too), so this is the base model's loss.
    base_val_loss = evaluate() if progress is None else None
    with compiled_decoder_layers(trained, config.compile):
        result = loop.run(progress)
    accelerator.wait_for_everyone()
    if not val_examples:
        save_best()
    accelerator.wait_for_everyone()

    report: dict[str, Any] = {
        "method": config.method,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "train_rows": data_stats.get("train_rows", len(train_examples)),
        "truncated_rows": data_stats.get("truncated_rows", 0),
        "steps": result.progress.step,
        "stopped_early": result.stopped_early,
        "final_train_loss": result.final_train_loss,
        "base_val_loss": base_val_loss,
        "final_val_loss": result.final_val_loss,
        "best_val_loss": result.progress.best_val_loss,
        "tokens_per_second": result.progress.tokens_seen / max(result.progress.elapsed, 1e-9),
        "train_seconds": result.progress.elapsed,
        "peak_memory_mb": peak_memory_mb(accelerator.device),
        "processes": accelerator.num_processes,
    }
    if main:
        if test_records and config.method == "lora":
            report.update(_exact_match_report(trained, best_dir, tokenizer, test_records, config))
        report["wall_seconds"] = time.perf_counter() - started
        report["output_dir"] = str(out)
        write_report(out / "report.json", report)
        records = loop.log.read()
        plot_loss_curve(records, out / "loss_curve.png", title=f"lorakit {config.method}: {Path(train_path).name}")
        print_report(report, title=f"lorakit train → {out}")
    accelerator.wait_for_everyone()
    return TrainResult(out, best_dir, report, trained)


def _save_trained(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """Atomically replace `directory` with the adapter (PEFT format) or the full model + tokenizer."""
    from lorakit.io.atomic import atomic_directory

    with atomic_directory(directory, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        if not isinstance(model, PeftModel):
            tokenizer.save_pretrained(tmp)


def _count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _exact_match_report(model: PeftModel, best_dir: Path, tokenizer, records: list[dict], config: TrainConfig) -> dict[str, Any]:
    """Exact match of the base model and of the best adapter on the test records with answers."""
    pairs = [(prompt_messages(r), reference_answer(r)) for r in records]
    pairs = [(p, a) for p, a in pairs if a is not None][: config.eval_limit]
    if not pairs:
        return {}
    conversations, references = [p for p, _ in pairs], [a for _, a in pairs]
    trained_adapter, was_training = model.active_adapter, model.training
    if best_dir.is_dir():
        model.load_adapter(best_dir, adapter_name="best")
        model.set_adapter("best", inference_mode=True)
    try:
        adapter_em, _ = score_exact_match(model, tokenizer, conversations, references, config.eval_max_new_tokens)
        with model.disable_adapter():
            base_em, _ = score_exact_match(model, tokenizer, conversations, references, config.eval_max_new_tokens)
    finally:
        # Only the main process scores: hand the model back as training left it, so that TrainResult.model
        # is the same on every process.
        if "best" in model.peft_config:
            model.delete_adapter("best")
        model.set_adapter(trained_adapter)
        model.train(was_training)
    return {"test_rows": len(pairs), "exact_match_base": base_em, "exact_match_adapter": adapter_em}
