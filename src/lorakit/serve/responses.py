"""The OpenAI response bodies `lorakit serve` sends: whole answers, streamed chunks and log-probabilities.

Log-probabilities come in the two shapes OpenAI uses:

* chat (`logprobs: true`, `top_logprobs: k`): `{"content": [{"token", "logprob", "bytes", "top_logprobs":
  [{"token", "logprob", "bytes"}, ...k]}, ...]}`, one entry per generated token;
* completions (`logprobs: k`, optionally `echo`): `{"tokens", "token_logprobs", "top_logprobs",
  "text_offset"}`, parallel lists over the (echoed prompt and) generated tokens; `top_logprobs[i]` maps
  the k most likely tokens and the chosen one to their logprobs; the first prompt token has None.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence

from lorakit.serve.sampling import TokenLogprob


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Logprobs:
    """Turns `TokenLogprob`s into OpenAI's two logprobs shapes (token ids decoded one by one)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def chat(self, infos: Sequence[TokenLogprob]) -> dict:
        def entry(token: int, logprob: float) -> dict:
            text = self.text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}

        return {"content": [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]}
                            for i in infos], "refusal": None}

    def completion(self, infos: Sequence[TokenLogprob], first: int | None = None, offset: int = 0) -> dict:
        """The tokens of `infos`, after `first` (the echoed prompt's first token, which has no logprob);
        text offsets count from `offset`."""
        lead = [] if first is None else [self.text(first)]
        tokens = [*lead, *(self.text(i.token) for i in infos)]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        tops = [{self.text(t): lp for t, lp in [*i.top, (i.token, i.logprob)]} for i in infos]
        return {"tokens": tokens, "token_logprobs": [None] * len(lead) + [i.logprob for i in infos],
                "top_logprobs": [None] * len(lead) + tops, "text_offset": offsets}


def completion_body(request_id: str, model: str, choices: list[dict], counts: dict[str, int]) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": counts}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_body(request_id: str, model: str, text: str, finish_reason: str, counts: dict[str, int],
              logprobs: dict | None = None) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": finish_reason}], "usage": counts}


def completion_chunk(request_id: str, model: str, choice: dict | None,
                     counts: dict[str, int] | None = None) -> dict:
    """A streamed piece of a completion; without `choice` the usage-only chunk that ends the stream."""
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice] if choice else [], "usage": counts}


def chat_chunk(request_id: str, model: str, delta: dict[str, str], finish_reason: str | None = None,
               counts: dict[str, int] | None = None, logprobs: dict | None = None) -> dict:
    """A streamed piece of a chat answer (`delta` holds the role first, then content pieces)."""
    choices = [] if counts else [{"index": 0, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": finish_reason}]
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, "usage": counts}


def sse(data: dict | str) -> str:
    """One server-sent event carrying `data` (JSON, or a literal such as "[DONE]")."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
