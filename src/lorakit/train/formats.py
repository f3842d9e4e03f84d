"""Record formats of training data, detected per file (one format per file), and their validation:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"prompt": "...", "completion": "..."}     (or message lists: prompt messages, assistant completion)
    {"text": "..."}

Roles are system, user, assistant and tool. A bad record raises a one-line DataError naming its location
("data.jsonl line 3") and what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from lorakit.errors import DataError

ROLES = ("system", "user", "assistant", "tool")

_FORMAT_FIELD = {"messages": '"messages"', "prompt_completion": '"prompt"+"completion"', "text": '"text"'}
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def record_format(record: Mapping[str, Any]) -> str | None:
    """"messages", "prompt_completion" or "text" by the fields present (in that order), else None."""
    if "messages" in record:
        return "messages"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def validate_records(records: Sequence[Mapping[str, Any]], source: str) -> str:
    """Raise DataError for the first bad record; return the file's format.

    `source` (the file name) names the file when there are no records, and names records that do
    not carry a `location` (plain dicts) as "<source> item N".
    """
    if not records:
        raise DataError(f"{source}: no examples")
    file_format, first = None, ""
    for number, record in enumerate(records, 1):
        location = getattr(record, "location", f"{source} item {number}")
        found = record_format(record)
        if found is None:
            raise DataError(
                f'{location}: missing field "messages" (expected "messages", "prompt"+"completion", or '
                f'"text")'
            )
        if file_format is None:
            file_format, first = found, location
        elif found != file_format:
            raise DataError(f"{location}: uses {_FORMAT_FIELD[found]} but {first} uses "
                            f"{_FORMAT_FIELD[file_format]} (one format per file)")
        _VALIDATORS[found](record, location)
    return file_format


def _validate_chat(record: Mapping[str, Any], location: str) -> None:
    check_messages(record["messages"], location, "messages")
    if not any(m["role"] == "assistant" for m in record["messages"]):
        raise DataError(f"{location}: no assistant message to learn from")


def _validate_prompt_completion(record: Mapping[str, Any], location: str) -> None:
    for field in ("prompt", "completion"):
        if field not in record:
            raise DataError(f'{location}: missing field "{field}"')
        value = record[field]
        if isinstance(value, list):
            check_messages(value, location, field)
        elif not isinstance(value, str):
            raise DataError(
                f'{location}: "{field}" must be a string or a list of messages, got {json_type(value)}'
            )
    completion = record["completion"]
    if isinstance(completion, list) and not any(m["role"] == "assistant" for m in completion):
        raise DataError(f"{location}: completion has no assistant message")
    if isinstance(completion, str) and not completion.strip():
        raise DataError(f"{location}: empty completion")


def _validate_text(record: Mapping[str, Any], location: str) -> None:
    if not isinstance(record["text"], str):
        raise DataError(f'{location}: "text" must be a string, got {json_type(record["text"])}')
    if not record["text"].strip():
        raise DataError(f"{location}: empty text")


def check_messages(messages: Any, location: str, field: str) -> None:
    """Raise DataError unless `messages` (the record's `field`) is a non-empty list of role/content
    objects."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else json_type(messages)
        raise DataError(
            f'{location}: "{field}" must be a non-empty list of {{"role", "content"}} objects, got {got}'
        )
    label = "message" if field == "messages" else f"{field} message"
    for number, message in enumerate(messages, 1):
        where = f"{location}: {label} {number}"
        if not isinstance(message, dict):
            raise DataError(
                f'{where}: expected an object with "role" and "content", got {json_type(message)}'
            )
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f'{where}: missing field "{key}"')
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(
                f"{where}: unknown role {json.dumps(role)} (expected system, user, assistant or tool)"
            )
        if not isinstance(content, str):
            raise DataError(f'{where}: "content" must be a string, got {json_type(content)}')
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: empty assistant message")


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages ("object", "array", "null", ...)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


_VALIDATORS = {
    "messages": _validate_chat,
    "prompt_completion": _validate_prompt_completion,
    "text": _validate_text,
}
