"""The OpenAI wire format `lorakit serve` speaks: request validation, errors, response and chunk bodies.

Requests are validated strictly (a string where a number belongs is an error, not coerced) and every
problem becomes an `APIError`, which the app turns into OpenAI's error body
`{"error": {"message", "type", "param", "code"}}` with a 4xx status. Parameters of the OpenAI API that
lorakit does not implement (penalties, logit_bias, user, ...) are accepted and ignored, as most
OpenAI-compatible servers do, so that ordinary clients work unchanged.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error answered with OpenAI's error body and an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingRequest(_Request):
    """What both endpoints share: the adapter (`model`), the sampling settings and streaming."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 4 or not all(stops)):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("give one prompt (a string, or a list holding one string)")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def as_template_message(self) -> dict[str, str]:
        """{"role", "content"} for the chat template (text parts joined; "developer" is the new "system")."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_limit(self) -> int | None:
        # max_completion_tokens is the newer name; max_tokens is deprecated but what most clients send.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class AdapterRequest(_Request):
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


def parse_body(raw: bytes, model: type[_Request]) -> Any:
    """The validated request, or APIError(400) naming the parameter at fault."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"We could not parse the JSON body of your request ({err}).", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        param = _param(errors[0]["loc"])
        if errors[0]["type"] == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'.", param=param,
                           code="missing_required_parameter") from None
        # A value matching no member of a union (str | list[str]) gives one error per member: say them all.
        reasons = dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errors if _param(e["loc"]) == param)
        raise APIError(400, f"Invalid value for '{param}': {'; or '.join(reasons)}.", param=param,
                       code="invalid_value") from None


def _param(loc: tuple) -> str | None:
    """The parameter path of a pydantic error location, without pydantic's union-member tags ('str',
    'list[str]'), e.g. messages.0.content."""
    parts = [str(p) for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _UNION_TAGS)]
    return ".".join(parts) or None


_UNION_TAGS = {"str", "int", "float", "bool"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, model: str, text: str, finish_reason: str, counts: dict[str, int]) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}], "usage": counts}


def chat_body(request_id: str, model: str, text: str, finish_reason: str, counts: dict[str, int]) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}], "usage": counts}


def completion_chunk(request_id: str, model: str, text: str, finish_reason: str | None = None,
                     counts: dict[str, int] | None = None) -> dict:
    """A streamed piece of a completion; with `counts` the usage-only chunk (no choices) that ends the stream."""
    choices = [] if counts else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": counts}


def chat_chunk(request_id: str, model: str, delta: dict[str, str], finish_reason: str | None = None,
               counts: dict[str, int] | None = None) -> dict:
    """A streamed piece of a chat answer (`delta` holds the role first, then content pieces)."""
    choices = [] if counts else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, "usage": counts}


def sse(data: dict | str) -> str:
    """One server-sent event carrying `data` (JSON, or a literal such as "[DONE]")."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
