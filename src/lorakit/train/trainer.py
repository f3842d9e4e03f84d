"""The one training loop, for every objective (SFT, DPO, ...): `Trainer(config, objective).run()`.

Order of work: processes and tokenizer; the objective's data (bad data fails before any model loads); the
run directory; the base model and the model the objective builds on it; the loop (progress bar,
evaluation, best model, early stopping, checkpoints, exact resume, NaN stop); then the best model, the
metrics, the plot and the report.

One optimizer step is one window of `grad_accum` micro-batches (`repeat` steps per window for objectives
that reuse a window). The summed loss of each micro-batch is divided by the objective's count for the whole
window over all processes, so accumulation and data parallelism give the update of one big batch.

Device and precision (`--device`, `--dtype`): one process runs where --device says; the processes of a launch
take accelerate's devices (a GPU each). A bf16/fp16 base trains with float32 trainable weights under
autocast, fp16 with loss scaling (train/precision.py); evaluation and the closing summary run under the
same autocast.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lorakit.device import resolve_dtype
from lorakit.errors import LorakitError
from lorakit.train.batching import epoch_batches, windows
from lorakit.train.checkpoint import Progress
from lorakit.train.compile import compiled_decoder_layers
from lorakit.train.config import TuningConfig
from lorakit.train.fsdp import FullySharded, check_launch
from lorakit.train.objective import Batch, Objective, ObjectiveModule
from lorakit.train.optim import build_optimizer, build_scheduler, total_optimizer_steps
from lorakit.train.parallel import DataParallel
from lorakit.train.precision import Precision, keep_trainable_float32
from lorakit.train.report import MetricsLog, RunReport, truncate_metrics
from lorakit.train.setup import (
    count_parameters,
    load_base_model,
    make_accelerator,
    prepare_output,
    training_device,
)
from lorakit.train.tracking import Tracking, log_with, logging_dir, trackers


@dataclass
class TrainResult:
    """Where a run's outputs went, its report, and the trained model itself.

    `model` is the model in memory as the last optimizer step left it (the PeftModel, or the transformers
    model with --method full), identical on every process of a distributed run; the model kept in
    `adapter_dir` is the best one by validation loss, which may be an earlier step's.
    """

    output_dir: Path
    adapter_dir: Path
    report: dict[str, Any]
    model: nn.Module


class Callback(Protocol):
    """Told about a run as it goes, on every process: `on_record` gets each metrics record (what
    metrics.jsonl holds: kind "train" or "eval", step, loss, ...), `on_end` the final report."""

    def on_record(self, record: dict[str, Any]) -> None: ...

    def on_end(self, report: dict[str, Any]) -> None: ...


class Trainer:
    """Runs `objective` as `config` describes; see the module docstring."""

    def __init__(
        self, config: TuningConfig, objective: Objective, callbacks: Sequence[Callback] = ()
    ) -> None:
        self.config = config
        self.objective = objective
        self.callbacks = list(callbacks)
        self.out = config.output_dir
        self.checkpoint_dir = self.out / "checkpoint"

    def run(self) -> TrainResult:
        """Train; every process of an `accelerate launch`/`torchrun` launch calls this."""
        from accelerate.utils import set_seed

        from lorakit.models.sources import load_tokenizer

        config, objective = self.config, self.objective
        self.acc = acc = make_accelerator(log_with(config), logging_dir(config), cpu=config.device == "cpu")
        self.device = training_device(config, acc)
        if config.fsdp:
            check_launch(acc.num_processes, config)
        self.tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        self.data = objective.datasets(self.tokenizer)
        if acc.is_main_process:
            prepare_output(config, f"{objective.name}_config.yaml")
        acc.wait_for_everyone()
        if trackers(config):
            self.callbacks.insert(0, Tracking(config, acc, objective.name))
        set_seed(config.seed)
        started = time.perf_counter()
        # A sharded model goes to the device only once sharded (FullySharded.setup).
        dtype = resolve_dtype(config.dtype, self.device)
        base, source = load_base_model(config, self.device, dtype, move=not config.fsdp)
        self.precision = Precision(self.device, dtype)
        self.model = objective.build(base, source)
        keep_trainable_float32(self.model)
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        parameters = count_parameters(self.model)
        self.parallel = FullySharded(acc) if config.fsdp else DataParallel(acc)
        self.objective_module = ObjectiveModule(objective, self.model)
        self.parallel.setup(self.objective_module)
        self.best_dir = self.out / ("adapter" if hasattr(self.model, "peft_config") else "model")
        self.log = MetricsLog(self.out / "metrics.jsonl", enabled=acc.is_main_process)
        self.report = RunReport(objective.describe, objective.loss_label, objective.curves)
        self.report.start(objective.method, self.data.stats, parameters)

        self._fit()
        acc.wait_for_everyone()
        if not self.data.validation:
            self._save_best()
        acc.wait_for_everyone()
        summary = self._summary()
        report = self.report.finish(self.device, acc.num_processes, acc.is_main_process, summary,
                                    time.perf_counter() - started, self.out, self.log.read())
        for callback in self.callbacks:
            callback.on_end(report)
        acc.wait_for_everyone()
        return TrainResult(self.out, self.best_dir, report, self.model)

    # ---- the loop ---------------------------------------------------------------------------------

    def _fit(self) -> None:
        config, acc = self.config, self.acc
        self.total_steps = total_optimizer_steps(len(self.data.train), config, acc.num_processes,
                                                 self.objective.repeat)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.module, self.optimizer = self.parallel.prepare(self.objective_module, self.optimizer)
        progress = self._resume() if config.resume else Progress()
        if not config.resume and self.objective.evaluate_first:
            self.report.values["base_val_loss"] = self._evaluate().get("loss")
        with compiled_decoder_layers(self.model, config.compile):
            self._loop(progress)
        self.report.values.update(
            self.parallel.memory(self.model, getattr(self.optimizer, "optimizer", self.optimizer))
        )

    def _loop(self, progress: Progress) -> None:
        config, acc = self.config, self.acc
        bar = _progress_bar(self.total_steps, progress.step, self.objective.describe, acc.is_main_process)
        started = time.perf_counter() - progress.elapsed
        self.module.train()
        epoch, stop, loss = progress.epoch, False, math.nan
        while progress.step < self.total_steps and not stop:
            for index, window in enumerate(self._windows(epoch)):
                if epoch == progress.epoch and index < progress.window:
                    continue
                loss, tokens, figures = self._step(window)
                progress.step, progress.epoch, progress.window = progress.step + 1, epoch, index + 1
                progress.tokens_seen += tokens
                progress.elapsed = time.perf_counter() - started
                if not math.isfinite(loss):
                    raise LorakitError(
                        f"loss became {loss} at step {progress.step}; stopped. The last good checkpoint "
                        f"is in {self.checkpoint_dir} (lower --learning-rate or check the data)"
                    )
                lr = self.scheduler.get_last_lr()[0]
                self._record(kind="train", step=progress.step, epoch=epoch, loss=loss, lr=lr,
                             tokens=progress.tokens_seen, elapsed=round(progress.elapsed, 3), **figures)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{progress.tokens_seen / max(progress.elapsed, 1e-9):,.0f}")
                at_end = progress.step >= self.total_steps
                if progress.step % config.eval_every == 0 or at_end:
                    stop = self._validate(progress, bar)
                if progress.step % (config.save_every or config.eval_every) == 0 and not at_end:
                    self._save_checkpoint(progress)
                if at_end or stop:
                    break
            else:
                epoch, progress.window = epoch + 1, 0
        bar.close()
        self.report.loop_done(progress, stop, loss)
        if stop and acc.is_main_process:
            print(f"early stopping at step {progress.step}: no validation improvement in "
                  f"{config.early_stopping_patience} evaluations")

    def _windows(self, epoch: int) -> list[list[list[int]]]:
        """This process's optimizer steps of one epoch: windows of micro-batches of example indices."""
        config, acc = self.config, self.acc
        batches = epoch_batches(self.data.lengths, config.batch_size, config.seed, epoch,
                                rank=acc.process_index, world_size=acc.num_processes)
        return [w for w in windows(batches, config.grad_accum) for _ in range(self.objective.repeat)]

    def _step(self, window: list[list[int]]) -> tuple[float, int, dict[str, Any]]:
        """One optimizer step over a window of micro-batches: (mean loss, tokens, mean figures)."""
        acc, device = self.acc, self.device
        batches = [self.objective.batch([self.data.train[i] for i in ids]) for ids in window]
        count = acc.reduce(torch.tensor(float(sum(self.objective.count(b) for b in batches)), device=device),
                           reduction="sum").clamp(min=1)
        total = torch.zeros((), device=device)
        figures: dict[str, Any] = {}
        for i, batch in enumerate(batches):
            batch = _to(batch, device)
            with self.parallel.no_sync(self.module, last=i == len(batches) - 1):
                with self.precision.autocast():
                    loss_sum, batch_figures = self.module(batch)
                # DDP averages gradients over processes; scale so the result is the mean over the window.
                self.precision.backward(acc, loss_sum * (acc.num_processes / count))
            total += loss_sum.detach()
            _accumulate(figures, batch_figures, len(batches))
        if self.config.max_grad_norm > 0:
            self.precision.unscale(self.optimizer)
            figures["grad_norm"] = self.parallel.clip_grad_norm(self.module, self.config.max_grad_norm)
        self.precision.step(self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean_loss = (acc.reduce(total, reduction="sum") / count).item()
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        return mean_loss, tokens * acc.num_processes, figures

    # ---- evaluation, the best model, checkpoints --------------------------------------------------

    def _evaluate(self) -> dict[str, float]:
        """The objective's validation figures (empty without validation data)."""
        if not self.data.validation:
            return {}
        acc = self.acc
        if self.parallel.sharded:
            # Sharded layers run collectives: every process must make the same forward calls, so each
            # evaluates all the data (and sums nothing).
            shard, reduce = self.data.validation, lambda t: t
        else:
            shard = self.data.validation[acc.process_index::acc.num_processes]
            reduce = lambda t: acc.reduce(t, reduction="sum")  # noqa: E731
        self.module.eval()
        try:
            # No-grad passes under --compile would compile graphs of their own: run them eagerly.
            with torch.no_grad(), torch.compiler.set_stance("force_eager"), self.precision.autocast():
                return self.objective_module.evaluate(shard, reduce)
        finally:
            self.module.train()

    def _validate(self, progress: Progress, bar) -> bool:
        """Evaluate, keep the best model; True when early stopping says stop."""
        figures = self._evaluate()
        val_loss = figures.get("loss")
        self.report.values["final_val_loss"] = val_loss
        if val_loss is None:
            return False
        self.report.last_eval = figures
        self._record(kind="eval", step=progress.step, val_loss=val_loss,
                     **{f"val_{k}": v for k, v in figures.items() if k != "loss"})
        if self.acc.is_main_process:  # tqdm.write prints even for a disabled bar
            bar.write(f"step {progress.step}: validation loss {val_loss:.4f}")
        if progress.best_val_loss is None or val_loss < progress.best_val_loss:
            progress.best_val_loss, progress.evals_without_improvement = val_loss, 0
            self._save_best()
            return False
        progress.evals_without_improvement += 1
        patience = self.config.early_stopping_patience
        return patience is not None and progress.evals_without_improvement >= patience

    def _save_best(self) -> None:
        self.parallel.save_best(self.model, self.best_dir, self.tokenizer)

    def _save_checkpoint(self, progress: Progress) -> None:
        self.parallel.save_checkpoint(
            self.checkpoint_dir,
            self.model,
            self.optimizer,
            self.scheduler,
            progress,
            self.objective.state_dict(),
        )

    def _resume(self) -> Progress:
        progress, state = self.parallel.load_checkpoint(self.checkpoint_dir, self.model, self.optimizer,
                                                        self.scheduler)
        self.objective.load_state_dict(state)
        if self.acc.is_main_process:
            truncate_metrics(self.log, progress.step)
        return progress

    def _summary(self) -> dict[str, Any]:
        """The objective's closing report entries, from the main process. Under --fsdp the model cannot
        leave its shards for a scoring pass on one process, so scores that need one are left to
        `lorakit eval` on the saved adapter."""
        if self.parallel.sharded:
            return {"summary": f"not scored under --fsdp; run `lorakit eval --adapter {self.best_dir}`"}
        if not self.acc.is_main_process:
            return {}
        with self.precision.autocast():
            return self.objective.summary(self.model, self.best_dir)

    def _record(self, **record: Any) -> None:
        self.log.write(**record)
        for callback in self.callbacks:
            callback.on_record(record)


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _accumulate(figures: dict[str, Any], new: dict[str, Any], micro_batches: int) -> None:
    """Numbers are averaged over the window's micro-batches; anything else (sample texts) is kept last."""
    for key, value in new.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            figures[key] = figures.get(key, 0.0) + value / micro_batches
        else:
            figures[key] = value


def _progress_bar(total: int, initial: int, describe: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=describe, unit="step", disable=not enabled, dynamic_ncols=True
    )
