"""Preference data for DPO: reading, validating and encoding (prompt, chosen, rejected) rows, and batches.

A row holds a prompt and two answers to it, the preferred one first:

    {"prompt": "...", "chosen": "...", "rejected": "..."}
    {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}

Strings and message lists may be mixed. Files are read like SFT data (`data.load_records`: JSONL, JSON,
Parquet, CSV; message lists in CSV/Parquet may be JSON strings), and bad rows fail the same way, before
any model is loaded, with a one-line DataError naming the file and line.

Each side is encoded exactly as SFT encodes a prompt/completion record (`tokenize.encode_example`): the
same chat template rendering and the same mask (the answer's tokens and its end-of-turn token count, the
prompt and the template scaffolding do not), so DPO scores precisely what `lorakit train` would learn.

Lengths: each side is at most `max_seq_len` tokens. An answer that does not fit is cut and the pair
counted as truncated, as SFT does with rows. A prompt is never cut (that would change the question the
answers answer): a prompt longer than `max_prompt_len`, or one that leaves no room within `max_seq_len`
for an answer token, is an error naming its line.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorakit.errors import DataError
from lorakit.train.data import BUNDLED_DIR, Record, load_records, split_validation
from lorakit.train.formats import check_messages, json_type
from lorakit.train.tokenize import IGNORE_INDEX, collate, encode_example

FIELDS = ("prompt", "chosen", "rejected")
SIDES = ("chosen", "rejected")
SPLITS = ("train", "validation")


def bundled_preference_path(split: str) -> Path:
    """The bundled date-format preference file for "train" or "validation"."""
    if split not in SPLITS:
        raise ValueError(f"bundled_preference_path: unknown split {split!r} (expected {', '.join(SPLITS)})")
    return BUNDLED_DIR / f"demo_preference_{split}.jsonl"


# ------------------------------------------------------------------------------------------- validation


def validate_preference_records(records: Sequence[Mapping[str, Any]], source: str) -> None:
    """Raise DataError for the first bad row. `source` names the file when it has no rows, and names
    rows without a `location` (plain dicts) as "<source> item N"."""
    if not records:
        raise DataError(f"{source}: no examples")
    for number, record in enumerate(records, 1):
        location = getattr(record, "location", f"{source} item {number}")
        for name in FIELDS:
            if name not in record:
                raise DataError(
                    f'{location}: missing field "{name}" (preference data needs "prompt", "chosen" '
                    f'and "rejected")'
                )
            value = record[name]
            if isinstance(value, list):
                check_messages(value, location, name)
            elif not isinstance(value, str):
                raise DataError(
                    f'{location}: "{name}" must be a string or a list of messages, got {json_type(value)}'
                )
        for side in SIDES:
            answer = record[side]
            if isinstance(answer, str) and not answer.strip():
                raise DataError(f'{location}: empty "{side}"')
            if isinstance(answer, list) and not any(m["role"] == "assistant" for m in answer):
                raise DataError(f'{location}: "{side}" has no assistant message')
        if _same(record["chosen"], record["rejected"]):
            raise DataError(f'{location}: "chosen" and "rejected" are identical (nothing to prefer)')


def _same(a: Any, b: Any) -> bool:
    return a.strip() == b.strip() if isinstance(a, str) and isinstance(b, str) else a == b


# --------------------------------------------------------------------------------------------- encoding


def encode_pair(
    record: Record, tokenizer, max_seq_len: int, max_prompt_len: int | None = None
) -> dict[str, Any]:
    """Token ids and answer labels of both sides of a validated row, each cut to `max_seq_len` tokens.

    Returns `{chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels, length, truncated}`;
    `length` (the longer side) drives length-grouped batching.
    """
    location = getattr(record, "location", "example")
    encoded = {}
    for side in SIDES:
        # Encoded whole, then cut here: the prompt's length decides between cutting and refusing.
        pair = Record({"prompt": record["prompt"], "completion": record[side]}, location)
        encoded[side] = encode_example(pair, tokenizer, max_seq_len=sys.maxsize)
    prompt_len = min(_answer_start(e["labels"]) for e in encoded.values())
    if max_prompt_len is not None and prompt_len > max_prompt_len:
        raise DataError(
            f"{location}: the prompt has {prompt_len} tokens, more than max_prompt_len={max_prompt_len}"
        )
    if prompt_len >= max_seq_len:
        raise DataError(
            f"{location}: the prompt has {prompt_len} tokens, leaving no room for the answers within "
            f"max_seq_len={max_seq_len} (raise max_seq_len)"
        )
    example: dict[str, Any] = {"truncated": False}
    for side, e in encoded.items():
        example[f"{side}_input_ids"] = e["input_ids"][:max_seq_len]
        example[f"{side}_labels"] = e["labels"][:max_seq_len]
        example["truncated"] |= len(e["input_ids"]) > max_seq_len
    if example["chosen_input_ids"] == example["rejected_input_ids"]:
        raise DataError(f'{location}: "chosen" and "rejected" are identical within max_seq_len={max_seq_len} '
                        f"(raise max_seq_len)")
    example["length"] = max(len(example["chosen_input_ids"]), len(example["rejected_input_ids"]))
    return example


def _answer_start(labels: list[int]) -> int:
    """Index of the first scored token: everything before it is prompt (and template scaffolding)."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def build_preference_datasets(train_path: str | Path, tokenizer, *, validation_path: str | Path | None = None,
                              validation_fraction: float = 0.0, seed: int = 0, max_seq_len: int = 256,
                              max_prompt_len: int | None = None,
                              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]]:
    """(training pairs, validation pairs or None, stats), like `data.build_datasets` for SFT.

    Validation comes from `validation_path`, else from holding out `validation_fraction` of the training
    file (seeded), else there is none. Both files are validated before anything is tokenized.
    stats: train_pairs, validation_pairs, truncated_pairs (either side cut; train + validation), tokens
    (training, both sides).
    """
    source = Path(train_path).name
    train_records = load_records(train_path, validate=False)
    validate_preference_records(train_records, source)
    validation_records: list[Record] | None = None
    if validation_path is not None:
        validation_records = load_records(validation_path, validate=False)
        validate_preference_records(validation_records, Path(validation_path).name)
    elif validation_fraction > 0:
        train_records, validation_records = split_validation(train_records, validation_fraction, seed, source)

    def encode(records: list[Record]) -> list[dict[str, Any]]:
        return [encode_pair(r, tokenizer, max_seq_len, max_prompt_len) for r in records]

    train = encode(train_records)
    validation = encode(validation_records) if validation_records is not None else None
    stats = {
        "train_pairs": len(train),
        "validation_pairs": len(validation) if validation is not None else 0,
        "truncated_pairs": sum(e["truncated"] for e in train + (validation or [])),
        "tokens": sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in train),
    }
    return train, validation, stats


# ---------------------------------------------------------------------------------------------- batches


def collate_pairs(examples: Sequence[Mapping[str, Any]], pad_token_id: int | None) -> dict[str, Tensor]:
    """Pairs → `input_ids`, `attention_mask`, `labels` of shape (pairs, 2, length), side 0 chosen.

    One padded block holds both sides, so the policy scores chosen and rejected in one forward pass.
    With precomputed reference log-probs every
    example carries `ref_logps` (chosen, rejected), returned as a (pairs, 2) float tensor.
    """
    rows = [
        {"input_ids": e[f"{side}_input_ids"], "labels": e[f"{side}_labels"]}
        for e in examples
        for side in SIDES
    ]
    flat = collate(rows, pad_token_id)
    pairs = len(examples)
    batch = {
        "input_ids": flat["input_ids"].view(pairs, 2, -1),
        "attention_mask": flat["attention_mask"].view(pairs, 2, -1),
        "labels": flat["labels"].view(pairs, 2, -1),
    }
    if all("ref_logps" in e for e in examples):
        batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples], dtype=torch.float32)
    return batch
