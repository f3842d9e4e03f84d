"""Completions for training and scoring, decoded by the server's batch engine (serve/batch.py).

All rows — G samples of every prompt of a micro-batch, or one greedy answer per prompt — go through one
`serve.batch.Batch`: one prefill of the left-padded prompts, then one decoding step per token over a
shared KV cache, rows leaving the batch (and the cache) the moment they end. Rows end at an end-of-sequence
token, at a stop string (the text is cut before it, as `serve` does) or after `max_tokens` tokens. Each
row has its own temperature, top-p and seeded generator (`serve.sampling.pick_tokens`), so a row's
completion depends on its seed alone, not on the rest of the batch: runs are reproducible, and a resumed
run draws what an uninterrupted one would.

Each row also names the adapter it runs with (`row_adapters`): the trained one, the base (BASE_ROW), or
another loaded adapter, in the same batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.layers import BASE_ROW


@dataclass
class Completion:
    """One generated row: its tokens (with a final end-of-sequence token when it ended on one), its text
    (special tokens skipped, cut before a stop string) and why it ended ("stop" or "length")."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""


def end_of_sequence_ids(model: nn.Module, tokenizer) -> set[int]:
    """The ids that end a completion: the generation config's eos ids and the tokenizer's, as `serve`."""
    config = getattr(model, "generation_config", None)
    eos = config.eos_token_id if config is not None else None
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return {int(t) for t in ids if t is not None}


def seed_for(*parts: int) -> int:
    """A 63-bit generator seed from integers (run seed, draw number, row): deterministic across runs."""
    return hash(tuple(parts)) & (2**63 - 1)


@torch.no_grad()
def generate_rows(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[list[int]],
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    seeds: Sequence[int] | None = None,
    adapters: Sequence[str] | None = None,
) -> list[Completion]:
    """One completion per prompt (token ids), in one batched decode; the model is handed back in the
    train/eval mode it came in. `temperature` 0 is greedy; `seeds` (one per row) seed sampling rows;
    `adapters` (one per row) name each row's adapter (default: the model's active adapter)."""
    from lorakit.serve.batch import Batch
    from lorakit.serve.engine import Delta, Failed, Row

    if adapters is None:
        adapters = [getattr(model, "active_adapter", BASE_ROW)] * len(prompts)
    out = [Completion() for _ in prompts]
    errors: list[BaseException] = []

    def receiver(i: int):
        def emit(event) -> None:
            if isinstance(event, Delta):
                out[i].text += event.text
            elif isinstance(event, Failed):
                errors.append(event.error)
        return emit

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = Batch(tokenizer, int(pad or 0), end_of_sequence_ids(model, tokenizer))
    rows = [Row(prompt_ids=list(p), adapter=adapters[i], max_tokens=max_tokens, emit=receiver(i),
                temperature=temperature, top_p=top_p, stop=tuple(stop),
                seed=None if seeds is None else seeds[i]) for i, p in enumerate(prompts)]
    was_training = model.training
    model.eval()
    try:
        # Decoding shapes change every step: compiled decoder layers (--compile) would recompile, so eager.
        with torch.compiler.set_stance("force_eager"):
            batch.step(model, rows)
            while batch.rows:
                batch.step(model, [])
    finally:
        batch.close()
        model.train(was_training)
    if errors:
        raise LorakitError(f"generating completions failed: {errors[0]}") from errors[0]
    for completion, row in zip(out, rows):
        completion.tokens, completion.finish_reason = list(row.tokens), row.finish_reason or ""
    return out
