"""Preference tuning with LoRA (DPO, IPO) — the API behind `lorakit dpo`.

    from lorakit.train.dpo import DPOConfig, train_dpo
    result = train_dpo(DPOConfig(output="runs/dates-dpo"))

Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290) trains the policy πθ on pairs
(prompt, chosen, rejected) against a frozen reference π_ref; the losses are in `dpo_loss`. Here πθ is the
base model plus a trainable LoRA adapter and π_ref comes for free:

- a new adapter: π_ref is the same model with the adapter switched off (`disable_adapter()`), which is
  exactly the starting policy, since a fresh adapter is the identity;
- `--adapter DIR` (continue from an SFT adapter): DIR is loaded twice, trainable and frozen, and π_ref is
  the frozen copy, again exactly the starting policy, as DPO prescribes (the SFT model as reference); the
  extra memory is one adapter's;
- `--precompute-ref`: π_ref's log-probs are computed once for every pair before training, so a step runs
  one forward pass per pair instead of two.

Everything else is `lorakit train`'s: the loop (progress bar, validation, best adapter, checkpoints,
exact resume, NaN stop), metrics.jsonl, loss_curve.png and report.json. Each step's metrics also record
the reward accuracy and margin (see `dpo_loss`); validation records them on the validation pairs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.model import PeftModel
from lorakit.train.compile import compiled_decoder_layers
from lorakit.train.config import TuningConfig, finite
from lorakit.train.dpo_loss import LOSS_TYPES, PreferenceLoss, evaluate_preferences, precompute_reference
from lorakit.train.loop import LoopSettings, TrainingLoop
from lorakit.train.preference_data import build_preference_datasets, bundled_preference_path, collate_pairs
from lorakit.train.report import peak_memory_mb, plot_loss_curve, print_report, write_report
from lorakit.train.sft import (
    TrainResult,
    load_model_for_training,
    lora_config_for,
    make_accelerator,
    prepare_output,
)

CONFIG_FILE = "dpo_config.yaml"
REFERENCE_ADAPTER = "reference"


@dataclass
class DPOConfig(TuningConfig):
    """Every option of `lorakit dpo`: the shared training options (`TuningConfig`; `batch_size` counts
    pairs, `max_seq_len` bounds each side) plus preference tuning's own."""

    output: str = "runs/lorakit-dpo"
    # Lower than SFT's: on the bundled pairs 5e-4 drove the margin up by pushing the chosen answers' log-probs
    # down too (DPO's likelihood displacement) and greedy answers degraded; 1e-4 raises both (benchmarks/README.md).
    learning_rate: float = 1e-4
    eval_every: int = 20
    adapter: str | None = None
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    precompute_ref: bool = False
    max_prompt_len: int | None = None

    def validate(self) -> None:
        super().validate()
        self.check_positive_ints((), ("max_prompt_len",))
        if not finite(self.beta) or self.beta <= 0:
            raise self.bad("beta", "a positive number")
        if self.loss_type not in LOSS_TYPES:
            raise self.bad("loss_type", " or ".join(LOSS_TYPES))
        if not finite(self.label_smoothing) or not 0 <= self.label_smoothing < 0.5:
            raise self.bad("label_smoothing", "a probability in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"--label-smoothing: only --loss-type sigmoid uses it, not {self.loss_type}")
        if self.max_prompt_len is not None and self.max_prompt_len >= self.max_seq_len:
            raise ValueError(f"--max-prompt-len: expected less than --max-seq-len ({self.max_seq_len}) to leave room "
                             f"for the answers, got {self.max_prompt_len}")


def resolve_preference_paths(config: DPOConfig) -> tuple[str, str | None]:
    """(train, validation) files; with no --data, the bundled date-format preference splits."""
    if config.data is None:
        return str(bundled_preference_path("train")), config.validation_data or str(bundled_preference_path("validation"))
    return config.data, config.validation_data


def policy_model(base: torch.nn.Module, config: DPOConfig, model_dir: str) -> tuple[PeftModel, str | None]:
    """(the policy: base + trainable adapter, the name of the frozen reference adapter or None)."""
    if config.adapter is None:
        from lorakit import get_peft_model

        return get_peft_model(base, lora_config_for(config, model_dir)), None
    policy = PeftModel.from_pretrained(base, config.adapter, is_trainable=True)
    policy.load_adapter(config.adapter, adapter_name=REFERENCE_ADAPTER)  # frozen: is_trainable=False
    return policy, REFERENCE_ADAPTER


def train_dpo(config: DPOConfig) -> TrainResult:
    """Run one preference-tuning job as described by `config`; returns where its outputs went, the report
    and the trained model. Under `accelerate launch`/`torchrun` every process calls this."""
    from accelerate.utils import set_seed

    from lorakit.models.sources import load_tokenizer

    accelerator = make_accelerator()
    main, device = accelerator.is_main_process, accelerator.device
    train_path, val_path = resolve_preference_paths(config)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    train_pairs, val_pairs, stats = build_preference_datasets(
        train_path, tokenizer, validation_path=val_path, validation_fraction=config.validation_fraction,
        seed=config.seed, max_seq_len=config.max_seq_len, max_prompt_len=config.max_prompt_len,
    )
    if main:
        prepare_output(config, CONFIG_FILE)
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    started = time.perf_counter()

    base, model_dir = load_model_for_training(config, device)
    policy, reference_adapter = policy_model(base, config, model_dir)
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_fn = PreferenceLoss(policy, config.beta, config.loss_type, config.label_smoothing, reference_adapter)
    pad_id = tokenizer.pad_token_id
    if config.precompute_ref:
        precompute_reference(loss_fn, train_pairs + (val_pairs or []), config.batch_size, pad_id, device)
        if reference_adapter is not None:  # no longer needed: free it
            policy.delete_adapter(reference_adapter)
            loss_fn.reference_adapter = None
    trainable, total = policy.get_nb_trainable_parameters()

    out = config.output_dir
    best_dir = out / "adapter"
    last_eval: dict[str, float] = {}

    def save_best() -> None:
        if main:
            _save_adapter(policy, best_dir)

    def evaluate() -> float | None:
        if not val_pairs:
            return None
        shard = val_pairs[accelerator.process_index::accelerator.num_processes]
        last_eval.clear()
        with torch.compiler.set_stance("force_eager"):  # no-grad passes would compile graphs of their own
            last_eval.update(evaluate_preferences(loss_fn, shard, config.batch_size, pad_id, device,
                                                  reduce=lambda t: accelerator.reduce(t, reduction="sum")))
        return last_eval["loss"]

    settings = LoopSettings.from_config(config)
    loop = TrainingLoop(
        accelerator=accelerator, model=policy, loss_fn=loss_fn, train_examples=train_pairs,
        collate=lambda batch: collate_pairs(batch, pad_id), settings=settings, output_dir=out, evaluate=evaluate,
        save_best=save_best, extra_metrics=lambda batch: loss_fn.last_metrics,
        eval_metrics=lambda: {f"val_{k}": v for k, v in last_eval.items() if k != "loss"},
        describe=f"dpo {config.loss_type} β={config.beta}",
    )
    with compiled_decoder_layers(policy, config.compile):
        result = loop.run(loop.resume() if config.resume else None)
    accelerator.wait_for_everyone()
    if not val_pairs:
        save_best()
    accelerator.wait_for_everyone()

    report: dict[str, Any] = {
        "method": "dpo",
        "loss_type": config.loss_type,
        "beta": config.beta,
        "label_smoothing": config.label_smoothing,
        "reference": _describe_reference(config),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
        **{key: stats[key] for key in ("train_pairs", "validation_pairs", "truncated_pairs")},
        "steps": result.progress.step,
        "stopped_early": result.stopped_early,
        "final_train_loss": result.final_train_loss,
        "final_val_loss": result.final_val_loss,
        "best_val_loss": result.progress.best_val_loss,
        **{f"final_val_{k}": v for k, v in last_eval.items() if k != "loss"},
        "tokens_per_second": result.progress.tokens_seen / max(result.progress.elapsed, 1e-9),
        "train_seconds": result.progress.elapsed,
        "peak_memory_mb": peak_memory_mb(device),
        "processes": accelerator.num_processes,
    }
    if main:
        report["wall_seconds"] = time.perf_counter() - started
        report["output_dir"] = str(out)
        write_report(out / "report.json", report)
        plot_loss_curve(loop.log.read(), out / "loss_curve.png", title=f"lorakit dpo ({config.loss_type}): "
                        f"{Path(train_path).name}", ylabel=f"{config.loss_type} loss (per pair)")
        print_report(report, title=f"lorakit dpo → {out}")
    accelerator.wait_for_everyone()
    return TrainResult(out, best_dir, report, policy)


def _describe_reference(config: DPOConfig) -> str:
    reference = "base model (adapter disabled)" if config.adapter is None else f"starting adapter {config.adapter}"
    return reference + (", precomputed" if config.precompute_ref else "")


def _save_adapter(policy: PeftModel, directory: Path) -> None:
    """Atomically replace `directory` with the trained adapter alone (PEFT format), never the reference."""
    from lorakit.io.atomic import atomic_directory

    with atomic_directory(directory, overwrite=True) as tmp:
        policy.save_pretrained(tmp, selected_adapters=[policy.active_adapter])
