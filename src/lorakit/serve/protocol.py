"""The OpenAI requests `lorakit serve` takes: validation, with every problem an `APIError` (400).

Requests are validated strictly (a string where a number belongs is an error, not coerced), and every
sampling parameter is checked against its range before the request is queued, so that no value can fail
the batch it would join: `seed` must fit in 64 bits, `temperature` lie in [0, 2], `top_p` in (0, 1],
`logprobs`/`top_logprobs` in OpenAI's ranges. Parameters of the OpenAI API that lorakit does not
implement (penalties, logit_bias, user, ...) are accepted and ignored, as most OpenAI-compatible servers
do, so that ordinary clients work unchanged. Response bodies are in `responses`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorakit.serve.errors import APIError
from lorakit.serve.limits import load_json

SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer, as OpenAI and vLLM take it
MAX_PROMPTS = 64  # prompts in one /v1/completions request (each becomes a choice)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    def check(self) -> None:
        """Rules across parameters (APIError naming the parameter), after each one has been validated."""


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
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever comes (benchmarks)

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


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only with echo: score the prompt
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Prompt) -> Prompt:
        items = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        if not items or len(items) > MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts")
        return value

    def check(self) -> None:
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "Invalid value for 'max_tokens': 0 needs echo=true.", param="max_tokens",
                           code="invalid_value")

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def as_template_message(self) -> dict[str, str]:
        """{"role", "content"} for the chat template (text parts joined; "developer" is the new "system")."""
        parts = self.content if isinstance(self.content, list) else []
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in parts)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def check(self) -> None:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "Invalid value for 'top_logprobs': it needs logprobs=true.",
                           param="top_logprobs",
                           code="invalid_value")

    def token_limit(self) -> int | None:
        # max_completion_tokens is the newer name; max_tokens is deprecated but what most clients send.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_count(self) -> int | None:
        """None without logprobs, else how many alternatives to report per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class AdapterRequest(_Request):
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


def parse_body(raw: bytes, model: type[_Request]) -> Any:
    """The validated request, or APIError(400) naming the parameter at fault."""
    data = load_json(raw)
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        request = model.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        param = _param(errors[0]["loc"])
        if errors[0]["type"] == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'.", param=param,
                           code="missing_required_parameter") from None
        # A value matching no member of a union (str | list[str]) gives one error per member: say them all.
        reasons = dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errors
                                if _param(e["loc"]) == param)
        where = f"'{param}'" if param else "the request"
        raise APIError(400, f"Invalid value for {where}: {'; or '.join(reasons)}.", param=param,
                       code="invalid_value") from None
    request.check()
    return request


def _param(loc: tuple) -> str | None:
    """The parameter path of a pydantic error location, without pydantic's union-member tags ('str',
    'list[str]'), e.g. messages.0.content."""
    parts = [str(p) for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _UNION_TAGS)]
    return ".".join(parts) or None


_UNION_TAGS = {"str", "int", "float", "bool"}
