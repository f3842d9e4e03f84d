"""Supervised fine-tuning (LoRA or full): the objective behind `lorakit train`.

    from lorakit.train.sft import train
    from lorakit.train.config import TrainConfig
    result = train(TrainConfig(output="runs/dates"))

The loss is the mean negative log-likelihood of the supervised tokens (by default the assistant's answers;
see `tokenize`), computed without materialising logits for unsupervised positions (`loss`). After training,
when the test data has reference answers, the report gives the exact match of the base model and of the best
adapter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lorakit.train.config import TrainConfig
from lorakit.train.data import build_datasets, bundled_dataset_path, load_records
from lorakit.train.evaluate import best_adapter_exact_match, validation_loss
from lorakit.train.loss import IGNORE_INDEX, causal_lm_loss
from lorakit.train.objective import BaseObjective, Batch, Datasets, Example, Reduce
from lorakit.train.tokenize import collate
from lorakit.train.trainer import Callback, Trainer, TrainResult


def resolve_data_paths(config: TrainConfig) -> tuple[str, str | None, str | None]:
    """(train, validation, test) files; with no --data, the bundled demo splits."""
    if config.data is None:
        return (
            str(bundled_dataset_path("train")),
            config.validation_data or str(bundled_dataset_path("validation")),
            config.test_data or str(bundled_dataset_path("test")),
        )
    return config.data, config.validation_data, config.test_data


class SFTObjective(BaseObjective):
    """Next-token loss on the supervised tokens; a fresh LoRA adapter, or every weight with --method full."""

    name = "train"
    loss_label = "loss (nats / token)"
    evaluate_first = True

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.method = config.method
        self.describe = f"lora r={config.lora.r}" if config.method == "lora" else "full fine-tune"
        self.test_records: list[dict[str, Any]] = []

    def datasets(self, tokenizer: Any) -> Datasets:
        config = self.config
        self.tokenizer = tokenizer
        train_path, val_path, test_path = resolve_data_paths(config)
        train, validation, stats = build_datasets(
            train_path, tokenizer, validation_path=val_path, validation_fraction=config.validation_fraction,
            seed=config.seed, max_seq_len=config.max_seq_len, train_on_prompt=config.train_on_prompt,
            packing=config.packing,
        )
        self.test_records = load_records(test_path) if test_path else []
        return Datasets(train, [len(e["input_ids"]) for e in train], validation or [], stats)

    def build(self, base: nn.Module, source: str) -> nn.Module:
        if self.config.method == "full":
            for param in base.parameters():
                param.requires_grad_(True)
            self.model = base
        else:
            from lorakit import get_peft_model

            self.model = get_peft_model(
                base, dataclasses.replace(self.config.lora, base_model_name_or_path=source)
            )
        return self.model

    def batch(self, examples: list[Example]) -> Batch:
        return collate(examples, self.tokenizer.pad_token_id)

    def count(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        total, _ = causal_lm_loss(self.model, **batch)
        return total, {}

    def evaluate(self, examples: list[Example], reduce: Reduce) -> dict[str, float]:
        device = next(self.model.parameters()).device
        loss = validation_loss(
            self.model, examples, self.config.batch_size, self.tokenizer.pad_token_id, device, reduce=reduce
        )
        return {"loss": loss}

    def summary(self, model: nn.Module, best_dir: Path) -> dict[str, Any]:
        if not self.test_records or self.config.method != "lora":
            return {}
        return best_adapter_exact_match(model, best_dir, self.tokenizer, self.test_records,
                                        self.config.eval_max_new_tokens, self.config.eval_limit)


def train(config: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Run one fine-tuning job as described by `config`; returns where its outputs went, the report and the
    trained model. Launched by `accelerate launch` or `torchrun`, every process calls this (see
    docs/distributed.md). `callbacks` are told of every metrics record and of the final report."""
    return Trainer(config, SFTObjective(config), callbacks).run()
