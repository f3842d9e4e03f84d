"""What a training method supplies to the one `Trainer` (train/trainer.py): an `Objective`.

The Trainer owns everything that is the same for every method: the accelerator and processes, the run
directory, loading the base model, the optimisation loop with gradient accumulation, checkpoints and exact
resume, periodic evaluation, the best model, early stopping, the progress bar, metrics.jsonl, the plots and
the report. An objective owns what differs: its data, the model it trains around the base (a fresh adapter,
a continued one plus a frozen reference), how a micro-batch is made, its loss, and its evaluation.

Loss normalisation: `loss(batch)` returns a *sum* over the micro-batch and `count(batch)` what that sum is
divided by (supervised tokens for SFT, pairs for DPO). The Trainer divides by the count of the whole
accumulation window over all processes, so accumulation and data parallelism give the update of one big
batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

Example = dict[str, Any]
Batch = dict[str, Tensor]
Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor over the processes of a distributed run (the identity on one process)."""


@dataclass
class Datasets:
    """An objective's encoded examples, read and checked before any model loads."""

    train: list[Example]
    lengths: list[int]
    """Tokens per training example: batches group examples of similar length (less padding)."""
    validation: list[Example] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    """Counts for the report (rows read, rows truncated, ...)."""


class Objective(Protocol):
    """A training method, as the Trainer sees it.

    `name` is the command ("train", "dpo"): the run saves its options as `<name>_config.yaml`. `method` is
    the report's entry ("lora", "full", "dpo").
    `describe` labels the progress bar and plot; `loss_label` is the loss curve's y-axis label; `curves`
    names per-step figures plotted beside the loss. `evaluate_first` asks for an evaluation before the first
    step (reported as `base_val_loss`: for a fresh adapter, the base model's). `repeat` is how many
    consecutive optimizer steps use each window of examples (1; GRPO's μ reuses sampled completions).
    `state_dict`/`load_state_dict` carry what the objective must keep across a checkpoint for an exact
    resume (plain values and tensors).
    """

    name: str
    method: str
    describe: str
    loss_label: str
    curves: tuple[str, ...]
    evaluate_first: bool
    repeat: int

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...

    def datasets(self, tokenizer: Any) -> Datasets:
        """Read, check and encode the data. Runs before any model loads, so bad data fails first."""
        ...

    def build(self, base: nn.Module, source: str) -> nn.Module:
        """The model to train, made from the loaded base (`source`: where it was loaded from, recorded in
        the adapter's config): usually `get_peft_model(base, config.lora)`. Its trainable parameters are
        what the optimizer steps."""
        ...

    def batch(self, examples: list[Example]) -> Batch:
        """A micro-batch (tensors on the CPU) holding at least `attention_mask` (tokens/s counts it)."""
        ...

    def count(self, batch: Batch) -> int:
        """What this micro-batch's summed loss is to be divided by (supervised tokens, pairs, ...)."""
        ...

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """(summed loss of the micro-batch, figures to log for it). Runs inside the forward of the module
        the Trainer hands to DDP, so gradients synchronise over processes."""
        ...

    def evaluate(self, examples: list[Example], reduce: Reduce) -> dict[str, float]:
        """Validation figures over this process's share of the examples, summed over processes with
        `reduce`; must hold "loss" (lower is better: the best model and early stopping follow it)."""
        ...

    def summary(self, model: nn.Module, best_dir: Any) -> dict[str, Any]:
        """Entries the objective adds to the report after training (main process; e.g. exact match of
        the best adapter on test data). The model is handed back as training left it."""
        ...


class BaseObjective:
    """Defaults of the optional parts of `Objective`."""

    loss_label = "loss"
    curves: tuple[str, ...] = ()
    evaluate_first = False
    repeat = 1

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""

    def summary(self, model: nn.Module, best_dir: Any) -> dict[str, Any]:
        return {}


class ObjectiveModule(nn.Module):
    """The module the Trainer runs: its forward is the objective's loss and `evaluate` its evaluation, with
    `model` registered so that DDP sees (and synchronises) the trained parameters and FSDP2 shards them
    (the loss then runs inside the root unit's forward, where its own parameters are gathered)."""

    def __init__(self, objective: Objective, model: nn.Module) -> None:
        super().__init__()
        self.objective = objective
        self.model = model

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        return self.objective.loss(batch)

    def evaluate(self, examples: list[Example], reduce: Reduce) -> dict[str, float]:
        return self.objective.evaluate(examples, reduce)
