"""Evaluation: validation loss (teacher-forced) and exact match of greedy generations; `evaluate_models`
scores a base model and its adapters side by side (`lorakit eval`, options in EvalConfig)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.device import DEVICE_HELP, DTYPE_HELP, DtypeName, valid_device_name
from lorakit.options import TRUST_REMOTE_CODE_HELP, OptionError, Options, option, positive_ints
from lorakit.train.loss import causal_lm_loss
from lorakit.train.scoring import exact_match, normalise_answer
from lorakit.train.tokenize import collate

SAMPLES = 8
"""Test rows whose answers the report keeps (and trackers show) beside the exact-match figures."""


@torch.no_grad()
def validation_loss(model: nn.Module, examples: Sequence[dict[str, Any]], batch_size: int, pad_token_id: int,
                    device: torch.device, reduce: Callable[[Tensor], Tensor] | None = None) -> float:
    """Mean loss per supervised token over `examples` (summed over processes by `reduce` if given), with
    the model in eval mode (dropout off) and handed back in the mode it was in."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    try:
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start:start + batch_size]], pad_token_id)
            loss, n = causal_lm_loss(model, **{k: v.to(device) for k, v in batch.items()})
            total += loss.double()
            count += n.double()
    finally:
        model.train(was_training)
    if reduce is not None:
        total, count = reduce(total), reduce(count)
    return (total / count).item() if count > 0 else math.nan


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, conversations: Sequence[list[dict[str, str]]], *,
                     max_new_tokens: int = 24, batch_size: int = 16,
                     adapter_names: Sequence[str] | None = None) -> list[str]:
    """Greedy answers to each conversation (rendered with the chat template, generation prompt added)."""
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
               for c in conversations]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = slice(start, start + batch_size)
            encoded = tokenizer(prompts[rows], return_tensors="pt", padding=True, add_special_tokens=False)
            kwargs = {} if adapter_names is None else {"adapter_names": list(adapter_names[rows])}
            inputs = {k: v.to(device) for k, v in encoded.items()}
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, **kwargs)
            new_tokens = output[:, encoded["input_ids"].shape[1]:]
            answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [normalise_answer(a) for a in answers]


def score_exact_match(model: nn.Module, tokenizer, conversations: Sequence[list[dict[str, str]]],
                      references: Sequence[str], max_new_tokens: int = 24) -> tuple[float, list[str]]:
    """(exact match in [0, 1], the generated answers)."""
    answers = generate_answers(model, tokenizer, conversations, max_new_tokens=max_new_tokens)
    return exact_match(answers, references), answers


def best_adapter_exact_match(model: nn.Module, best_dir: Path, tokenizer,
                             records: Sequence[Mapping[str, Any]], max_new_tokens: int,
                             limit: int | None = None) -> dict[str, Any]:
    """Exact match of the base model and of the adapter saved in `best_dir` on the records that have a
    reference answer: {"test_rows", "exact_match_base", "exact_match_adapter", "exact_match_samples"}
    (empty if none has one); the samples are the first SAMPLES rows' question, reference and both answers.

    `model` is a PeftModel; the best adapter is loaded beside the trained one and removed again, and the
    model is handed back as it came (active adapter, train/eval mode).
    """
    from lorakit.train.data import prompt_messages, reference_answer

    pairs = [(prompt_messages(r), reference_answer(r)) for r in records]
    pairs = [(p, a) for p, a in pairs if a is not None][:limit]
    if not pairs:
        return {}
    conversations, references = [p for p, _ in pairs], [a for _, a in pairs]
    trained_adapter, was_training = model.active_adapter, model.training
    if best_dir.is_dir():
        model.load_adapter(best_dir, adapter_name="best")
        model.set_adapter("best", inference_mode=True)
    try:
        adapter_em, adapter_answers = score_exact_match(model, tokenizer, conversations, references,
                                                        max_new_tokens)
        with model.disable_adapter():
            base_em, base_answers = score_exact_match(model, tokenizer, conversations, references,
                                                      max_new_tokens)
    finally:
        if "best" in model.peft_config:
            model.delete_adapter("best")
        model.set_adapter(trained_adapter)
        model.train(was_training)
    samples = [{"question": c[-1]["content"] if c else "", "reference": r, "base": b, "adapter": a}
               for c, r, b, a in zip(conversations, references, base_answers, adapter_answers)][:SAMPLES]
    return {"test_rows": len(pairs), "exact_match_base": base_em, "exact_match_adapter": adapter_em,
            "exact_match_samples": samples}


@dataclass
class EvalConfig(Options):
    """Every option of `lorakit eval`: the model, its adapters, the data they are scored on, the output."""

    data: str | None = option(None, help="Data file (default: bundled demo test split).")
    model: str | None = option(None, help="Base model (default: embedded SmolLM2).")
    adapter: list[str] | None = option(None, help="Adapter NAME=DIR or DIR; repeat to compare several.",
                                       commas=False)
    max_seq_len: int = option(512, help="Truncate rows to this many tokens for the loss.")
    batch_size: int = option(8, help="Rows per forward pass.")
    max_new_tokens: int = option(24, help="Tokens generated per row for exact match.")
    limit: int | None = option(None, help="Evaluate at most N rows.")
    as_json: bool = option(False, help="Print JSON instead of a table.", flags=("--json",))
    device: str = option("auto", help=DEVICE_HELP)
    dtype: DtypeName = option("auto", help=DTYPE_HELP)
    trust_remote_code: bool = option(False, help=TRUST_REMOTE_CODE_HELP)

    def validate(self) -> None:
        positive_ints(self, ("max_seq_len", "batch_size", "max_new_tokens"), ("limit",))
        if not valid_device_name(self.device):
            raise OptionError("device", "auto, cpu, cuda or cuda:N", self.device)


def evaluate_models(model: nn.Module, tokenizer, adapters: Sequence[str],
                    config: EvalConfig) -> dict[str, Any]:
    """Loss, perplexity and, where rows have reference answers, exact match of the base model and of each
    adapter in `adapters` (loaded in `model`, a PeftModel; none: `model` is the base) on the rows of
    `config.data`: {"data", "rows", "results": [{"model", "loss", "perplexity"[, "exact_match"]}, ...]}."""
    from lorakit.train.data import bundled_dataset_path, load_records, prompt_messages, reference_answer
    from lorakit.train.tokenize import encode_example

    path = config.data or str(bundled_dataset_path("test"))
    records = load_records(path)[:config.limit]
    examples = [e for e in (encode_example(r, tokenizer, config.max_seq_len) for r in records)
                if any(t != -100 for t in e["labels"])]
    pairs = [(prompt_messages(r), reference_answer(r)) for r in records]
    pairs = [(p, a) for p, a in pairs if a is not None]
    device = next(model.parameters()).device
    results = []
    for name in ["base", *adapters]:
        if name != "base":
            model.set_adapter(name, inference_mode=True)
        row: dict[str, Any] = {"model": name}
        with model.disable_adapter() if name == "base" and adapters else contextlib.nullcontext():
            loss = validation_loss(model, examples, config.batch_size, tokenizer.pad_token_id, device)
            row.update(loss=loss, perplexity=math.exp(loss) if loss < 50 else math.inf)
            if pairs:
                row["exact_match"], _ = score_exact_match(model, tokenizer, [p for p, _ in pairs],
                                                          [a for _, a in pairs], config.max_new_tokens)
        results.append(row)
    return {"data": path, "rows": len(records), "results": results}
