"""Checks that run on a request body before anything else looks at it: UTF-8, JSON without NaN or
Infinity, a nesting depth limit and no lone surrogates in any string.

The body size limit is enforced earlier, while the body is read (`guard.Guard`), and the prompt length cap
in characters later, before tokenising (`server.Server`). Each failure is a 400 in OpenAI's error shape
instead of a 500 from deep inside a parser or a tokenizer.
"""

from __future__ import annotations

import json
from typing import Any

from lorakit.serve.errors import APIError

MAX_JSON_DEPTH = 32  # a chat request with content parts nests 5 deep; nothing legitimate nests 32


def load_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON value of `raw`, or APIError(400): bad UTF-8 or JSON, NaN/Infinity, too deep, lone
    surrogates."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(400, f"The request body is not valid UTF-8 ({err.reason} at byte {err.start}).",
                       code="invalid_json") from None
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except (json.JSONDecodeError, ValueError) as err:
        raise APIError(400, f"We could not parse the JSON body of your request ({err}).",
                       code="invalid_json") from None
    check_value(data, max_depth)
    return data


def check_value(data: Any, max_depth: int) -> None:
    """Walk `data` (iteratively: no recursion to exhaust) for the depth limit and unencodable strings."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise _too_deep(max_depth)
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400,
                               "The request holds a string that is not valid Unicode (a lone surrogate such "
                               f"as \\u{ord(value[_first_surrogate(value)]):04x}).",
                               code="invalid_unicode") from None


def _first_surrogate(value: str) -> int:
    return next(i for i, c in enumerate(value) if 0xD800 <= ord(c) <= 0xDFFF)


def _too_deep(max_depth: int) -> APIError:
    return APIError(400, f"The JSON body nests deeper than {max_depth} levels.", code="invalid_json")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
