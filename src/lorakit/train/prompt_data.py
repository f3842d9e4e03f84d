"""Prompt data for `lorakit grpo`: rows with a prompt and any other columns, which reward functions receive.

Files are read as for training (JSONL/JSON/Parquet/CSV, `train.data.load_records`). A row is

    {"prompt": "...", "answer": "...", ...}                      a prompt string
    {"prompt": [{"role": "user", "content": "..."}], ...}         a prompt as messages
    {"messages": [..., {"role": "assistant", "content": "..."}]}  chat data: the turns before the last
                                                                  assistant turn are the prompt, that turn
                                                                  becomes the `--answer-column` column

A prompt string is the user's message: with a chat template it is rendered as one user turn (as
`lorakit train` renders prompt/completion rows), without one it is the raw text. Messages are rendered with
the chat template and its generation prompt. Bad rows fail here, before any model loads, with a one-line
DataError naming the file and line or row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lorakit.errors import DataError
from lorakit.train.data import load_records
from lorakit.train.formats import check_messages

PROMPT_KEYS = ("prompt", "messages")


def prompt_text(prompt: str | list[dict[str, Any]], tokenizer) -> str:
    """The text the model continues: the chat-template rendering with its generation prompt, or a
    string prompt itself when the tokenizer has no chat template."""
    if isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _prompt_of(record: Mapping[str, Any], location: str, answer_column: str) -> tuple[Any, dict[str, Any]]:
    """(prompt, other columns) of one row."""
    columns = {k: v for k, v in record.items() if k not in PROMPT_KEYS}
    if "prompt" in record:
        prompt = record["prompt"]
    elif "messages" in record:
        messages = record["messages"]
        check_messages(messages, location, "messages")
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        prompt = messages if last is None else messages[:last]
        if last is not None and answer_column not in columns:
            columns[answer_column] = messages[last].get("content")
    else:
        raise DataError(f'{location}: expected a "prompt" (a string or messages) or a "messages" column')
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{location}: empty prompt")
    else:
        check_messages(prompt, location, "prompt")
    return prompt, columns


def load_prompts(path: str, tokenizer, *, max_prompt_len: int, answer_column: str = "answer",
                 required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every row of `path` as {"index", "prompt", "columns", "prompt_ids"}; rows lacking a column of
    `required` (the exact-match reward's answer column) or with a prompt over `max_prompt_len` tokens
    are errors."""
    records = load_records(path, validate=False)
    if not records:
        raise DataError(f"{path}: no rows")
    rows = []
    for index, record in enumerate(records):
        location = getattr(record, "location", f"{path} row {index + 1}")
        prompt, columns = _prompt_of(record, location, answer_column)
        for column in required:
            if columns.get(column) is None:
                raise DataError(
                    f'{location}: missing column "{column}" (the exact_match reward compares with it; '
                    "see --answer-column)"
                )
        ids = tokenizer(prompt_text(prompt, tokenizer), add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_len:
            raise DataError(
                f"{location}: the prompt is {len(ids)} tokens, more than the {max_prompt_len} that "
                "--max-seq-len leaves after --max-completion-length"
            )
        rows.append({"index": index, "prompt": prompt, "columns": columns, "prompt_ids": ids})
    # Reward functions get every column as a list aligned with the completions: a row without one gets None.
    names = sorted({name for row in rows for name in row["columns"]})
    for row in rows:
        row["columns"] = {name: row["columns"].get(name) for name in names}
    return rows
