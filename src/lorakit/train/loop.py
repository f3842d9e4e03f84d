"""The optimisation loop shared by SFT and preference tuning, on accelerate.

One optimizer step = one window of `grad_accum` micro-batches. The loss is normalised by the number of
supervised tokens in the whole window across all processes, so gradient accumulation and data
parallelism give the same update as one big batch. The loop owns progress reporting, periodic
validation, best-adapter tracking, early stopping, checkpoints and NaN detection; what a batch's loss
is comes from the `loss_fn` module it is given.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.train.batching import batches_per_epoch, epoch_batches, windows
from lorakit.train.checkpoint import Progress, load_checkpoint, save_checkpoint
from lorakit.train.config import TuningConfig
from lorakit.train.report import MetricsLog, truncate_metrics


@dataclass
class LoopSettings:
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    lr_scheduler: str
    max_grad_norm: float
    batch_size: int
    grad_accum: int
    epochs: float
    max_steps: int | None
    eval_every: int
    save_every: int | None
    early_stopping_patience: int | None
    seed: int

    @classmethod
    def from_config(cls, config: TuningConfig) -> LoopSettings:
        """The loop's settings from a trainer's options: the fields of the same names."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


@dataclass
class LoopResult:
    progress: Progress
    final_train_loss: float
    final_val_loss: float | None
    stopped_early: bool
    total_steps: int


def build_optimizer(model: nn.Module, settings: LoopSettings) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases, norms and DoRA magnitudes."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type == "cuda" for g in groups for p in g["params"])
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.learning_rate, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, settings: LoopSettings, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if settings.lr_scheduler == "constant" else settings.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=total_steps)


def total_optimizer_steps(n_examples: int, settings: LoopSettings, world_size: int) -> tuple[int, int]:
    """(total steps, steps per epoch) for this run."""
    batches = batches_per_epoch(n_examples, settings.batch_size, world_size)
    if batches == 0:
        # No process could take a step: the loop would go round empty epochs forever.
        raise LorakitError(f"{n_examples} training rows: too few to give each of {world_size} processes a batch")
    per_epoch = math.ceil(batches / settings.grad_accum)
    total = settings.max_steps or max(1, math.ceil(settings.epochs * per_epoch))
    return total, per_epoch


class TrainingLoop:
    """Runs optimizer steps over `train_examples`; see the module docstring for the contract.

    loss_fn(**batch) → (summed loss, token count); `collate(examples) → batch dict`; `lengths` drive
    length-grouped batching; `evaluate()` → validation loss (or None); `eval_metrics()` → more values from
    that evaluation for its metrics record (preference tuning's reward accuracy); `save_best()` stores the
    best model; `model` is what the checkpoint saves (the PeftModel, or the full model). A batch without
    `labels` is normalised by its rows (preference pairs) instead of its supervised tokens.
    """

    def __init__(self, *, accelerator, model: nn.Module, loss_fn: nn.Module, train_examples: list[dict[str, Any]],
                 collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]], settings: LoopSettings,
                 output_dir: Path, evaluate: Callable[[], float | None], save_best: Callable[[], None],
                 extra_metrics: Callable[[dict[str, torch.Tensor]], dict[str, float]] | None = None,
                 eval_metrics: Callable[[], dict[str, float]] | None = None,
                 describe: str = "train") -> None:
        self.accelerator = accelerator
        self.model = model
        self.train_examples = train_examples
        self.collate = collate
        self.settings = settings
        self.output_dir = output_dir
        self.evaluate = evaluate
        self.save_best = save_best
        self.extra_metrics = extra_metrics
        self.eval_metrics = eval_metrics
        self.describe = describe
        self.lengths = [len(e["input_ids"]) if "input_ids" in e else e["length"] for e in train_examples]
        self.total_steps, self.steps_per_epoch = total_optimizer_steps(len(train_examples), settings, accelerator.num_processes)
        self.optimizer = build_optimizer(model, settings)
        self.scheduler = build_scheduler(self.optimizer, settings, self.total_steps)
        self.loss_fn, self.optimizer = accelerator.prepare(loss_fn, self.optimizer)
        self.log = MetricsLog(output_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
        self.checkpoint_dir = output_dir / "checkpoint"

    def resume(self) -> Progress:
        progress = load_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.scheduler)
        if self.accelerator.is_main_process:
            truncate_metrics(self.log, progress.step)
        return progress

    def run(self, progress: Progress | None = None) -> LoopResult:
        acc, settings = self.accelerator, self.settings
        progress = progress or Progress()
        device = acc.device
        bar = _progress_bar(self.total_steps, progress.step, self.describe, acc.is_main_process)
        last_loss, val_loss, stopped_early = math.nan, None, False
        started = time.perf_counter() - progress.elapsed
        self.loss_fn.train()
        epoch = progress.epoch
        while progress.step < self.total_steps and not stopped_early:
            batches = epoch_batches(self.lengths, settings.batch_size, settings.seed, epoch,
                                    rank=acc.process_index, world_size=acc.num_processes)
            for index, window in enumerate(windows(batches, settings.grad_accum)):
                if epoch == progress.epoch and index < progress.window:
                    continue
                loss_value, tokens, extras = self._step(window, device)
                progress.step += 1
                progress.epoch, progress.window = epoch, index + 1
                progress.tokens_seen += tokens
                progress.elapsed = time.perf_counter() - started
                if not math.isfinite(loss_value):
                    raise LorakitError(
                        f"loss became {loss_value} at step {progress.step}; stopped. The last good checkpoint is in "
                        f"{self.checkpoint_dir} (lower --learning-rate or check the data)"
                    )
                last_loss = loss_value
                lr = self.scheduler.get_last_lr()[0]
                self.log.write(kind="train", step=progress.step, epoch=epoch, loss=loss_value, lr=lr, tokens=progress.tokens_seen,
                               elapsed=round(progress.elapsed, 3), **extras)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{progress.tokens_seen / max(progress.elapsed, 1e-9):,.0f}")
                at_end = progress.step >= self.total_steps
                if progress.step % settings.eval_every == 0 or at_end:
                    val_loss = self.evaluate()
                    stopped_early = self._track_best(progress, val_loss)
                    if val_loss is not None:
                        extras = self.eval_metrics() if self.eval_metrics is not None else {}
                        self.log.write(kind="eval", step=progress.step, val_loss=val_loss, **extras)
                        if acc.is_main_process:  # tqdm.write prints even for a disabled bar
                            bar.write(f"step {progress.step}: validation loss {val_loss:.4f}")
                save_every = settings.save_every or settings.eval_every
                if progress.step % save_every == 0 and not at_end:
                    self.save_checkpoint(progress)
                if at_end or stopped_early:
                    break
            else:
                epoch += 1
                progress.window = 0
        bar.close()
        if stopped_early and acc.is_main_process:
            print(f"early stopping at step {progress.step}: no validation improvement in "
                  f"{settings.early_stopping_patience} evaluations")
        return LoopResult(progress, last_loss, val_loss, stopped_early, self.total_steps)

    def save_checkpoint(self, progress: Progress) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.scheduler, progress)
        self.accelerator.wait_for_everyone()

    def _track_best(self, progress: Progress, val_loss: float | None) -> bool:
        """Keep the best model by validation loss; True when early stopping says stop."""
        if val_loss is None:
            return False
        if progress.best_val_loss is None or val_loss < progress.best_val_loss:
            progress.best_val_loss = val_loss
            progress.evals_without_improvement = 0
            self.save_best()
            return False
        progress.evals_without_improvement += 1
        patience = self.settings.early_stopping_patience
        return patience is not None and progress.evals_without_improvement >= patience

    def _step(self, window: list[list[int]], device: torch.device) -> tuple[float, int, dict[str, float]]:
        """One optimizer step over a window of micro-batches; returns (mean loss, tokens, extra metrics)."""
        acc = self.accelerator
        batches = [self.collate([self.train_examples[i] for i in ids]) for ids in window]
        supervised = sum(_supervised_tokens(b) for b in batches)
        window_tokens = acc.reduce(torch.tensor(float(supervised), device=device), reduction="sum")
        total_loss = torch.zeros((), device=device)
        extras: dict[str, float] = {}
        for i, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            sync = contextlib.nullcontext() if i == len(batches) - 1 else acc.no_sync(self.loss_fn)
            with sync:
                loss_sum, _ = self.loss_fn(**batch)
                # DDP averages gradients over processes; scale so the result is the mean over the window.
                scaled = loss_sum * (acc.num_processes / window_tokens.clamp(min=1))
                acc.backward(scaled)
            total_loss += loss_sum.detach()
            if self.extra_metrics is not None:
                for key, value in self.extra_metrics(batch).items():
                    extras[key] = extras.get(key, 0.0) + value / len(batches)
        if self.settings.max_grad_norm > 0:
            acc.clip_grad_norm_(self.loss_fn.parameters(), self.settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean_loss = (acc.reduce(total_loss, reduction="sum") / window_tokens.clamp(min=1)).item()
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        return mean_loss, tokens * acc.num_processes, extras


def _supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    if "labels" in batch:
        return int((batch["labels"][:, 1:] != -100).sum())
    return int(batch["input_ids"].shape[0])


def _progress_bar(total: int, initial: int, describe: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=describe, unit="step", disable=not enabled, dynamic_ncols=True)
