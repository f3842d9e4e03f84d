"""Preference tuning with LoRA (DPO, IPO): the objective behind `lorakit dpo`.

    from lorakit.train.dpo import train_dpo
    from lorakit.train.config import DPOConfig
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

Everything else is the Trainer's (train/trainer.py). Each step's metrics also record the reward accuracy
and margin (see `dpo_loss`); validation records them on the validation pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lorakit.model import PeftModel
from lorakit.train.config import DPOConfig
from lorakit.train.dpo_loss import PreferenceLoss, evaluate_preferences, precompute_reference, reward_metrics
from lorakit.train.objective import BaseObjective, Batch, Datasets, Example, Reduce
from lorakit.train.preference_data import build_preference_datasets, bundled_preference_path, collate_pairs
from lorakit.train.trainer import Callback, Trainer, TrainResult

REFERENCE_ADAPTER = "reference"


def resolve_preference_paths(config: DPOConfig) -> tuple[str, str | None]:
    """(train, validation) files; with no --data, the bundled date-format preference splits."""
    if config.data is None:
        return str(bundled_preference_path("train")), config.validation_data or str(
            bundled_preference_path("validation")
        )
    return config.data, config.validation_data


class DPOObjective(BaseObjective):
    """The DPO/IPO loss of preference pairs against the adapter-off (or starting-adapter) reference."""

    name = method = "dpo"

    def __init__(self, config: DPOConfig) -> None:
        self.config = config
        self.describe = f"dpo {config.loss_type} β={config.beta}"
        self.loss_label = f"{config.loss_type} loss (per pair)"

    def datasets(self, tokenizer: Any) -> Datasets:
        config = self.config
        self.pad_id = tokenizer.pad_token_id
        train_path, val_path = resolve_preference_paths(config)
        train, validation, stats = build_preference_datasets(
            train_path, tokenizer, validation_path=val_path, validation_fraction=config.validation_fraction,
            seed=config.seed, max_seq_len=config.max_seq_len, max_prompt_len=config.max_prompt_len,
        )
        self.data = Datasets(train, [e["length"] for e in train], validation or [], stats)
        return self.data

    def build(self, base: nn.Module, source: str) -> nn.Module:
        """The policy (base + trainable adapter) and, with --adapter, its frozen copy as the reference;
        with --precompute-ref the reference log-probs of every pair, after which that copy is freed."""
        config = self.config
        reference = None
        if config.adapter is None:
            from lorakit import get_peft_model

            policy = get_peft_model(base, dataclasses.replace(config.lora, base_model_name_or_path=source))
        else:
            policy = PeftModel.from_pretrained(base, config.adapter, is_trainable=True)
            policy.load_adapter(config.adapter, adapter_name=REFERENCE_ADAPTER)  # frozen: is_trainable=False
            reference = REFERENCE_ADAPTER
        self.scorer = PreferenceLoss(policy, config.beta, config.loss_type, config.label_smoothing, reference)
        if config.precompute_ref:
            device = next(policy.parameters()).device
            precompute_reference(self.scorer, self.data.train + self.data.validation, config.batch_size,
                                 self.pad_id, device)
            if reference is not None:
                policy.delete_adapter(reference)
                self.scorer.reference_adapter = None
        return policy

    def batch(self, examples: list[Example]) -> Batch:
        return collate_pairs(examples, self.pad_id)

    def count(self, batch: Batch) -> int:
        return batch["input_ids"].shape[0]

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        losses, chosen, rejected = self.scorer.pair_losses(**batch)
        return losses.sum(), reward_metrics(chosen, rejected)

    def evaluate(self, examples: list[Example], reduce: Reduce) -> dict[str, float]:
        device = next(self.scorer.model.parameters()).device
        return evaluate_preferences(
            self.scorer, examples, self.config.batch_size, self.pad_id, device, reduce
        )

    def summary(self, model: nn.Module, best_dir: Path) -> dict[str, Any]:
        config = self.config
        reference = (
            "base model (adapter disabled)"
            if config.adapter is None
            else f"starting adapter {config.adapter}"
        )
        return {"loss_type": config.loss_type, "beta": config.beta, "label_smoothing": config.label_smoothing,
                "reference": reference + (", precomputed" if config.precompute_ref else "")}


def train_dpo(config: DPOConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Run one preference-tuning job as described by `config`; returns where its outputs went, the report
    and the trained model. Under `accelerate launch`/`torchrun` every process calls this."""
    return Trainer(config, DPOObjective(config), callbacks).run()
