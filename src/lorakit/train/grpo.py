"""Reinforcement learning from rewards a program checks (GRPO and its variants): the objective behind
`lorakit grpo`.

    from lorakit.train.grpo import train_grpo
    from lorakit.train.grpo_config import GRPOConfig
    result = train_grpo(GRPOConfig(output="runs/dates-grpo"))

Each window of prompts is turned into a batch once: G completions per prompt sampled in one batched decode
with a KV cache (`sampling`, the server's engine), scored by the reward functions (`rewards`), and given
group-normalised advantages (`grpo_loss`). The Trainer then takes μ = `--num-iterations` optimizer steps on
that batch (`repeat`): the first at ratio 1 against the sampling policy, the later ones clipped against
the log-probs the sampling policy gave (computed once, when sampling). The reference of the KL penalty
costs no second model, as in `lorakit dpo`: it is the policy with the adapter switched off, or with
`--adapter` the starting adapter kept frozen beside the trained one; its log-probs are computed once per
batch too.

The objective learns which optimizer step it is working for from the Trainer's calling order (every
micro-batch of a window is made before any of its losses), so reward errors name the step. Exact resume:
the draw counter (sampling seeds derive from it), the step and the batches still to be reused are part of
the checkpoint. Validation scores greedy answers (`loss` = −mean reward, so the best adapter is the one
with the highest); after training the report scores the test prompts with the base and the best adapter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.layers import BASE_ROW
from lorakit.train.dpo_loss import reference_mode
from lorakit.train.grpo_config import GRPOConfig
from lorakit.train.grpo_loss import ClippedObjective, group_advantages
from lorakit.train.loss import IGNORE_INDEX, supervised_token_nll
from lorakit.train.objective import BaseObjective, Batch, Datasets, Example, Reduce
from lorakit.train.prompt_data import load_prompts
from lorakit.train.rewards import build_rewards, exact_match_reward, score
from lorakit.train.sampling import Completion, generate_rows, seed_for
from lorakit.train.trainer import Callback, Trainer, TrainResult

REFERENCE_ADAPTER = "reference"
SAMPLES = 2
"""Completions per step kept in metrics.jsonl (the first group's first ones)."""


def resolve_prompt_paths(config: GRPOConfig) -> tuple[str, str | None, str | None]:
    """(train, validation, test) files; with no --data, the bundled date task's splits."""
    from lorakit.train.data import bundled_dataset_path

    if config.data is None:
        return (
            str(bundled_dataset_path("train")),
            config.validation_data or str(bundled_dataset_path("validation")),
            config.test_data or str(bundled_dataset_path("test")),
        )
    return config.data, config.validation_data, config.test_data


def completion_batch(prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int) -> Batch:
    """Prompt + completion per row, right-padded: input_ids, attention_mask, labels (the completion tokens,
    IGNORE_INDEX elsewhere), `lengths` (rows,) completion tokens per row and `rows` (tokens,) the row of
    each completion token in row-major order (the order of `supervised_token_nll`'s values)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :len(p) + len(c)] = torch.tensor(list(p) + list(c))
        mask[i, :len(p) + len(c)] = 1
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
    lengths = torch.tensor([len(c) for c in completions])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "lengths": lengths,
            "rows": torch.arange(len(prompts)).repeat_interleave(lengths)}


def completion_logps(model: nn.Module, batch: Batch) -> Tensor:
    """log π(o_t | q, o_<t) of every completion token, flat in row-major order (k,)."""
    return -supervised_token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


class GRPOObjective(BaseObjective):
    """The clipped group-relative policy objective on sampled completions; see the module docstring."""

    name = method = "grpo"
    loss_label = "GRPO loss"
    evaluate_first = True

    def __init__(self, config: GRPOConfig) -> None:
        self.config = config
        self.repeat = config.num_iterations
        loss = "" if config.loss_type == "grpo" else f" ({config.loss_type})"
        self.describe = f"grpo{loss} G={config.num_generations} β={config.beta}"
        self.curves = ("reward", "completion_length") + (("kl",) if config.beta > 0 else ())
        self.clipped = ClippedObjective(config.loss_type, config.epsilon, config.epsilon_upper, config.beta,
                                        config.max_completion_length)
        self.step = self.draws = self.zero_variance_groups = self.groups = 0
        self.pending: dict[tuple[int, ...], list[Any]] = {}
        self.window_started = False
        self.reference: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "draws": self.draws,
            "zero_variance_groups": self.zero_variance_groups,
            "groups": self.groups,
            "pending": [[list(k), batch, uses] for k, (batch, uses) in self.pending.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("step", "draws", "zero_variance_groups", "groups"):
            setattr(self, name, state.get(name, 0))
        self.pending = {tuple(k): [batch, uses] for k, batch, uses in state.get("pending", [])}

    def datasets(self, tokenizer: Any) -> Datasets:
        config = self.config
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rewards = build_rewards(config.reward, config.reward_weights, answer_column=config.answer_column,
                                     regex=config.reward_regex, length_target=config.length_target)
        train_path, val_path, test_path = resolve_prompt_paths(config)
        required = (config.answer_column,) if "exact_match" in config.reward else ()
        options = dict(max_prompt_len=config.max_seq_len - config.max_completion_length,
                       answer_column=config.answer_column, required=required)
        train = load_prompts(train_path, tokenizer, **options)
        validation = load_prompts(val_path, tokenizer, **options) if val_path else []
        if not validation and config.validation_fraction:
            from lorakit.train.data import split_validation

            train, validation = split_validation(train, config.validation_fraction, config.seed, train_path)
        self.test = load_prompts(test_path, tokenizer, **{**options, "required": ()}) if test_path else []
        stats = {"train_prompts": len(train), "validation_prompts": len(validation),
                 "num_generations": config.num_generations, "rewards": [r.name for r in self.rewards]}
        return Datasets(train, [len(e["prompt_ids"]) for e in train], validation, stats)

    def build(self, base: nn.Module, source: str) -> nn.Module:
        """The policy: base + a fresh adapter, or `--adapter` trainable plus its frozen copy (the
        reference)."""
        config = self.config
        if config.adapter is None:
            from lorakit import get_peft_model

            self.model = get_peft_model(
                base, dataclasses.replace(config.lora, base_model_name_or_path=source)
            )
        else:
            from lorakit.model import PeftModel

            self.model = PeftModel.from_pretrained(base, config.adapter, is_trainable=True)
            self.model.load_adapter(config.adapter, adapter_name=REFERENCE_ADAPTER)  # frozen
            self.reference = REFERENCE_ADAPTER
        return self.model

    def batch(self, examples: list[Example]) -> Batch:
        """The window's sampled, scored batch for these prompts: drawn on its first use, reused μ times."""
        if not self.window_started:  # the first micro-batch of a new optimizer step
            self.step, self.window_started = self.step + 1, True
        key = tuple(e["index"] for e in examples)
        if key not in self.pending:
            self.pending[key] = [self._draw(examples), 0]
        entry = self.pending[key]
        entry[1] += 1
        if entry[1] >= self.repeat:
            del self.pending[key]
        return entry[0]

    def count(self, batch: Batch) -> int:
        return int(batch["count"])

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Any]]:
        self.window_started = False
        logps = completion_logps(self.model, batch)
        total, figures = self.clipped.loss(
            logps,
            batch.get("old_logps"),
            batch.get("ref_logps"),
            batch["advantages"],
            batch["rows"],
            batch["lengths"],
            batch["keep"],
        )
        return total, {**batch["figures"], **figures}

    def evaluate(self, examples: list[Example], reduce: Reduce) -> dict[str, float]:
        totals = self._greedy_scores(examples, [self.model.active_adapter] * len(examples))
        device = next(self.model.parameters()).device
        summed = {
            k: reduce(torch.tensor(v * len(examples), device=device, dtype=torch.float64))
            for k, v in totals.items()
        }
        count = reduce(torch.tensor(float(len(examples)), device=device, dtype=torch.float64))
        figures = {k: (v / count).item() for k, v in summed.items()}
        return {"loss": -figures["reward"], **figures}

    def summary(self, model: nn.Module, best_dir: Path) -> dict[str, Any]:
        config = self.config
        reference = (
            "base model (adapter disabled)"
            if config.adapter is None
            else f"starting adapter {config.adapter}"
        )
        values: dict[str, Any] = {
            "loss_type": config.loss_type,
            "beta": config.beta,
            "reference": reference,
            "zero_variance_groups": self.zero_variance_groups,
            "groups_sampled": self.groups,
        }
        test = self.test[:config.eval_limit]
        if test:
            values.update(self._test_scores(best_dir, test))
        return values

    # ---- sampling and scoring -------------------------------------------------------------------------

    def _draw(self, examples: list[Example]) -> Batch:
        """G completions per prompt sampled from the policy, as `scored_batch` (on the CPU)."""
        config, group = self.config, self.config.num_generations
        self.draws += 1
        prompt_ids = [e["prompt_ids"] for e in examples for _ in range(group)]
        seeds = [seed_for(config.seed, self.draws, i) for i in range(len(prompt_ids))]
        completions = generate_rows(
            self.model,
            self.tokenizer,
            prompt_ids,
            max_tokens=config.max_completion_length,
            temperature=config.temperature,
            top_p=config.top_p,
            stop=config.stop,
            seeds=seeds,
            adapters=[self.model.active_adapter] * len(prompt_ids),
        )
        return self.scored_batch(examples, completions)

    def scored_batch(self, examples: list[Example], completions: Sequence[Completion]) -> Batch:
        """The batch of G = len(completions) / len(examples) completions per prompt (consecutive), scored:
        rewards, advantages, π_old's and π_ref's log-probs where needed, and the figures to log."""
        config, group = self.config, len(completions) // len(examples)
        prompt_ids = [e["prompt_ids"] for e in examples for _ in range(group)]
        texts = [c.text for c in completions]
        prompts = [e["prompt"] for e in examples for _ in range(group)]
        columns = {
            k: [e["columns"][k] for e in examples for _ in range(group)] for k in examples[0]["columns"]
        }
        rewards, means = score(self.rewards, prompts, texts, columns, self.step)
        rewards_t = torch.tensor(rewards, dtype=torch.float32)
        advantages, zero = group_advantages(rewards_t, group, self.clipped.scale_rewards)
        keep = self.clipped.kept(zero, group)
        self.zero_variance_groups += int(zero.sum())
        self.groups += len(examples)
        batch = completion_batch(prompt_ids, [c.tokens for c in completions], self.pad_id)
        batch.update(
            advantages=advantages, keep=keep, count=torch.tensor(self.clipped.count(batch["lengths"], keep))
        )
        if config.num_iterations > 1:
            batch["old_logps"] = self._fixed_logps(batch, reference=False)
        if config.beta > 0:
            batch["ref_logps"] = self._fixed_logps(batch, reference=True)
        batch["figures"] = {
            "reward": rewards_t.mean().item(),
            "reward_std": rewards_t.reshape(-1, group).std(dim=1).mean().item(),
            **means,
            "completion_length": batch["lengths"].float().mean().item(),
            "truncated": sum(c.finish_reason == "length" for c in completions) / len(completions),
            "zero_variance_groups": zero.float().mean().item(),
            "samples": [{"completion": t, "reward": r} for t, r in zip(texts[:SAMPLES], rewards[:SAMPLES])],
        }
        return batch

    @torch.no_grad()
    def _fixed_logps(self, batch: Batch, reference: bool) -> Tensor:
        """Per-token log-probs of the sampling policy (π_old) or of the reference, without gradients."""
        device = next(self.model.parameters()).device
        on_device = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
        if reference:
            with reference_mode(self.model, len(batch["lengths"]), self.reference):
                return completion_logps(self.model, on_device).cpu()
        was_training = self.model.training
        self.model.eval()
        try:
            return completion_logps(self.model, on_device).cpu()
        finally:
            self.model.train(was_training)

    def _greedy_scores(self, examples: Sequence[Example], adapters: Sequence[str]) -> dict[str, float]:
        """Mean rewards ("reward" and each "reward_<name>") of greedy answers, one per example."""
        texts = self._greedy_texts(examples, adapters)
        columns = {k: [e["columns"][k] for e in examples] for k in examples[0]["columns"]}
        total, means = score(self.rewards, [e["prompt"] for e in examples], texts, columns, self.step)
        return {"reward": sum(total) / len(total), **means}

    def _greedy_texts(self, examples: Sequence[Example], adapters: Sequence[str]) -> list[str]:
        chunk = self.config.batch_size * self.config.num_generations
        texts: list[str] = []
        for start in range(0, len(examples), chunk):
            rows = examples[start:start + chunk]
            texts += [
                c.text
                for c in generate_rows(
                    self.model,
                    self.tokenizer,
                    [e["prompt_ids"] for e in rows],
                    max_tokens=self.config.max_completion_length,
                    stop=self.config.stop,
                    adapters=adapters[start : start + chunk],
                )
            ]
        return texts

    def _test_scores(self, best_dir: Path, test: list[Example]) -> dict[str, Any]:
        """Greedy answers of the base and of the best adapter to the test prompts, in one batch: mean
        rewards and, where the rows have the answer column, exact match."""
        model, trained = self.model, self.model.active_adapter
        best = "best" if best_dir.is_dir() else trained
        if best == "best":
            model.load_adapter(best_dir, adapter_name="best")
        try:
            texts = self._greedy_texts(test + test, [BASE_ROW] * len(test) + [best] * len(test))
        finally:
            if best == "best":
                model.delete_adapter("best")
            model.set_adapter(trained)
        base, tuned = texts[:len(test)], texts[len(test):]
        values: dict[str, Any] = {"test_rows": len(test)}
        columns = {k: [e["columns"][k] for e in test] for k in test[0]["columns"]}
        prompts = [e["prompt"] for e in test]
        for label, answers in (("base", base), ("adapter", tuned)):
            total, _ = score(self.rewards, prompts, answers, columns, self.step)
            values[f"test_reward_{label}"] = sum(total) / len(total)
        answers = columns.get(self.config.answer_column)
        if answers is not None and all(a is not None for a in answers):
            match = exact_match_reward(self.config.answer_column)
            values["exact_match_base"] = sum(match(prompts, base, **columns)) / len(test)
            values["exact_match_adapter"] = sum(match(prompts, tuned, **columns)) / len(test)
        values["test_samples"] = [
            {
                "prompt": e["prompt"] if isinstance(e["prompt"], str) else e["prompt"][-1]["content"],
                "base": b,
                "adapter": a,
            }
            for e, b, a in zip(test, base, tuned)
        ][:8]
        return values


def train_grpo(config: GRPOConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Run one GRPO job as described by `config`; returns where its outputs went, the report and the
    trained model. Under `accelerate launch`/`torchrun` every process calls this."""
    return Trainer(config, GRPOObjective(config), callbacks).run()
