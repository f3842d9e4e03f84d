"""One batched generation over requests for different adapters, streaming text as tokens are produced.

Why a decoding loop of our own rather than `model.generate`: `generate` returns (or hands a streamer)
tokens only for a whole batch in lockstep, applies one set of sampling settings to every row and cannot
drop finished rows. Here each step is one forward of the model over the batch's unfinished rows with the
KV cache (`past_key_values`), per-row adapters (`row_adapters`, computed by the batched mixed-adapter
path of `lorakit.layers.mixed`) and per-row sampling; after each step every row's new text is handed to
its request. Rows that finish (end-of-sequence token, stop string, max_tokens, client gone) are removed
from the batch and the cache, so a long answer does not keep short ones' rows computing.

Prompts are left-padded into one tensor; positions are counted from each row's first real token, as
`generate` does, so a row's tokens are what it would get alone (greedy: identical up to float rounding).
This runs on the server's single model thread; `emit` callbacks carry results back to the event loop.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lorakit.layers import row_adapters
from lorakit.model import PeftModel


@dataclass(frozen=True)
class Delta:
    """New text of a row."""

    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Delta | Finished | Failed


@dataclass(eq=False)
class Row:
    """One request's share of a batch. `cancelled` is set from the event loop when the client goes away."""

    prompt_ids: list[int]
    adapter: str  # an adapter name, or BASE_ROW
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    done: bool = False


class TextTracker:
    """Turns a row's growing token list into text deltas, minding stop strings and split characters."""

    def __init__(self, tokenizer, eos_ids: set[int]) -> None:
        self.tokenizer, self.eos_ids = tokenizer, eos_ids

    def push(self, row: Row, token: int) -> None:
        """Record `token` for `row`; emit its new text, and Finished when the row is done."""
        if row.cancelled:
            row.done = True
            return
        row.tokens.append(token)
        ended = token in self.eos_ids
        text = self.tokenizer.decode(row.tokens[:-1] if ended else row.tokens, skip_special_tokens=True)
        reason = "stop" if ended else None
        cut = min((i for i in (text.find(s) for s in row.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif reason is None and len(row.tokens) >= row.max_tokens:
            reason = "length"
        if reason is None:
            # Hold back what may still change: a character whose bytes are not all decoded yet (U+FFFD at the
            # end) and a tail that could be the start of a stop string.
            text = text.rstrip("\ufffd")
            text = text[:len(text) - _stop_prefix_length(text, row.stop)]
        if text.startswith(row.sent) and len(text) > len(row.sent):
            row.emit(Delta(text[len(row.sent):]))
            row.sent = text
        if reason is not None:
            row.done = True
            row.emit(Finished(reason, len(row.prompt_ids), len(row.tokens)))


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that begins some stop string (it may complete it later)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def _pick_tokens(logits: Tensor, rows: Sequence[Row], generators: Sequence[torch.Generator | None]) -> Tensor:
    """Next token per row: argmax for temperature 0, else top-p sampling from softmax(logits / T)."""
    chosen = logits.argmax(dim=-1)
    for i, (row, generator) in enumerate(zip(rows, generators)):
        if row.temperature == 0 or generator is None:
            continue
        probs = torch.softmax(logits[i].float() / row.temperature, dim=-1)
        if row.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest head of the distribution whose mass reaches top_p (always the top token).
            outside = sorted_probs.cumsum(-1) - sorted_probs >= row.top_p
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        chosen[i] = torch.multinomial(probs, 1, generator=generator)[0]
    return chosen


def _generator(row: Row, device: torch.device) -> torch.Generator | None:
    if row.temperature == 0:
        return None
    return torch.Generator(device=device).manual_seed(row.seed if row.seed is not None else secrets.randbits(63))


@torch.inference_mode()
def generate_batch(model: nn.Module, tokenizer, rows: Sequence[Row], pad_id: int, eos_ids: set[int]) -> None:
    """Generate every row to its end, emitting text as it comes. `model` is a PeftModel (rows may use any
    of its adapters, BASE_ROW for none) or a plain transformers model (all rows BASE_ROW)."""
    from transformers import DynamicCache

    tracker = TextTracker(tokenizer, eos_ids)
    device = next(model.parameters()).device
    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
        mask[i, width - len(row.prompt_ids):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [_generator(row, device) for row in rows]
    cache = DynamicCache(config=model.config)
    # A PeftModel gets every row's adapter, BASE_ROW included (without row_adapters its active adapter would
    # apply to all rows).
    per_row = isinstance(model, PeftModel)
    accepts = inspect.signature((model.get_base_model() if per_row else model).forward).parameters
    # transformers 5 renames past_key_values to cache, model by model; only the last position's logits are
    # needed, but not every model's forward takes logits_to_keep.
    cache_kwarg = "cache" if "cache" in accepts else "past_key_values"
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
    live = list(range(len(rows)))
    step_ids = ids
    with ExitStack() as block:
        block_rows = None
        while True:
            if per_row and block_rows != live:
                # One row_adapters() block while the batch's rows stay the same, rather than adapter_names at
                # every step: layers check their stacked factors once per block, not once per token
                # (layers/mixed.py). Adapters change only between batches, on this same thread.
                block.close()
                block.enter_context(row_adapters([rows[i].adapter for i in live]))
                block_rows = list(live)
            logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           **{cache_kwarg: cache}, **last_only).logits[:, -1, :]
            tokens = _pick_tokens(logits, [rows[i] for i in live], [generators[i] for i in live])
            for i, token in zip(live, tokens.tolist()):
                tracker.push(rows[i], token)
            keep = [j for j, i in enumerate(live) if not rows[i].done]
            if not keep:
                return
            if len(keep) < len(live):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, positions, tokens = mask[index], positions[index], tokens[index]
                live = [live[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            positions = positions[:, -1:] + 1
            step_ids = tokens.unsqueeze(1)
