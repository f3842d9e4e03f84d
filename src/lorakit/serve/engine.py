"""A request as a batch row: its settings, the events it sends back, and its text as tokens come.

A `Row` is created on the event loop and handed to the scheduler; the model thread (`batch.Batch`) fills
in its tokens and calls `TextTracker.push` for each, which turns the growing token list into text deltas
(minding stop strings and characters split across tokens) and sends them to the request through `emit`.
`emit` only queues the event onto the event loop, so the model thread never waits for a client.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lorakit.serve.sampling import TokenLogprob


@dataclass(frozen=True)
class Delta:
    """New text of a row, with the log-probabilities of the tokens generated since the last Delta (when the
    request asked for them)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """Log-probabilities of prompt tokens 1.. (completions with echo and logprobs; token 0 has none)."""

    entries: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end of sequence or a stop string), "length" (max_tokens) or "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Delta | PromptLogprobs | Finished | Failed


@dataclass(eq=False)
class Row:
    """One request's share of a batch. `cancelled` is set from the event loop when the client goes away;
    the model thread sees it before its next step."""

    prompt_ids: list[int]
    adapter: str  # an adapter name, or BASE_ROW
    max_tokens: int  # 0 only for echo: score the prompt, generate nothing
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: each token's logprob and the k most likely ones
    prompt_logprobs: bool = False
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None
    generator: torch.Generator | None = None

    def seed_generator(self, device: torch.device) -> None:
        """The row's own random stream (sampling rows only): its tokens depend on its seed, not the batch."""
        if self.temperature > 0:
            seed = self.seed if self.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def finish(self, reason: str) -> None:
        self.done, self.finish_reason = True, reason
        self.emit(Finished(reason, len(self.prompt_ids), len(self.tokens)))


class TextTracker:
    """Turns a row's growing token list into text deltas, minding stop strings and split characters."""

    def __init__(self, tokenizer, eos_ids: set[int]) -> None:
        self.tokenizer, self.eos_ids = tokenizer, eos_ids

    def push(self, row: Row, token: int, logprob: TokenLogprob | None = None) -> None:
        """Record `token` for `row`; emit its new text, and Finished when the row is done."""
        if row.first_token_at is None:
            row.first_token_at = time.monotonic()
        row.tokens.append(token)
        ended = token in self.eos_ids and not row.ignore_eos
        if logprob is not None and not ended:
            row.unsent_logprobs.append(logprob)
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
        grew = text.startswith(row.sent) and len(text) > len(row.sent)
        if grew or (reason is not None and row.unsent_logprobs):
            row.emit(Delta(text[len(row.sent):] if grew else "", tuple(row.unsent_logprobs)))
            row.sent = text if grew else row.sent
            row.unsent_logprobs = []
        if reason is not None:
            row.finish(reason)


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that begins some stop string (it may complete it later)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest
