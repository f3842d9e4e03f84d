"""Evaluation: validation loss (teacher-forced) and exact match of greedy generations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorakit.train.loss import CausalLMLoss
from lorakit.train.scoring import exact_match, normalise_answer
from lorakit.train.tokenize import collate


@torch.no_grad()
def validation_loss(loss_fn: CausalLMLoss, examples: Sequence[dict[str, Any]], batch_size: int, pad_token_id: int,
                    device: torch.device, reduce=None) -> float:
    """Mean loss per supervised token over `examples` (summed over processes by `reduce` if given)."""
    was_training = loss_fn.training
    loss_fn.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start:start + batch_size]], pad_token_id)
        loss, n = loss_fn(**{k: v.to(device) for k, v in batch.items()})
        total += loss.double()
        count += n.double()
    if reduce is not None:
        total, count = reduce(total), reduce(count)
    loss_fn.train(was_training)
    return (total / count).item() if count > 0 else math.nan


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, conversations: Sequence[list[dict[str, str]]], *,
                     max_new_tokens: int = 24, batch_size: int = 16, adapter_names: Sequence[str] | None = None) -> list[str]:
    """Greedy answers to each conversation (rendered with the chat template, generation prompt added)."""
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            kwargs = {"adapter_names": list(adapter_names[start:start + batch_size])} if adapter_names is not None else {}
            output = model.generate(
                **{k: v.to(device) for k, v in encoded.items()}, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, **kwargs,
            )
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
