"""Training data: reading files, holding out a validation split, building datasets (records are validated by
train/formats.py).

File types: JSON Lines (.jsonl/.ndjson), JSON (.json: an array of examples, an object with a "data"
array, or JSON Lines), Parquet and CSV. Record formats, detected per file (one format per file):

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"prompt": "...", "completion": "..."}     (or message lists: prompt messages, assistant completion)
    {"text": "..."}

Roles are system, user, assistant and tool. In CSV and Parquet, a message list may also be stored as
a JSON string in its column.

Bad data fails here, before any model is loaded, with a one-line DataError naming the file and the
line (JSONL/JSON), row (CSV/Parquet, counting data rows from 1) or item (JSON array).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorakit.errors import DataError
from lorakit.train.formats import json_type, validate_records
from lorakit.train.tokenize import IGNORE_INDEX, conversation, encode_example, pack_examples

SPLITS = ("train", "validation", "test")
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "data"

_log = logging.getLogger(__name__)


class Record(dict):
    """One example as read from its file. `location` ("data.jsonl line 3") names it in error messages;
    it is an attribute rather than a key so that it never reaches the tokenizer or a saved dataset."""

    location: str

    def __init__(self, fields: Mapping[str, Any], location: str) -> None:
        super().__init__(fields)
        self.location = location


# ---------------------------------------------------------------------------------------------- reading


def load_records(path: str | Path, *, validate: bool = True) -> list[Record]:
    """Every example in `path`, in file order, checked by `validate_records` unless validate=False."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
               ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path.name}: unsupported file type {path.suffix!r} (expected .jsonl, .json, .parquet or .csv)"
        )
    records = reader(path)
    if validate:
        validate_records(records, path.name)
    return records


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # tolerate the BOM some editors write
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{name} line {line}: not valid UTF-8") from None


def _read_jsonl(path: Path) -> list[Record]:
    return _parse_jsonl(_decode(path.read_bytes(), path.name), path.name)


def _parse_jsonl(text: str, name: str) -> list[Record]:
    # Parsed line by line (not with `datasets`) so that every error names its line. Split on "\n"
    # only: str.splitlines would also split on U+2028 and friends, which JSON strings may contain.
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{name} line {number}: invalid JSON ({error.msg} at column {error.colno})"
            ) from None
        records.append(_as_record(value, f"{name} line {number}"))
    return records


def _read_json(path: Path) -> list[Record]:
    # The standard json module, not `datasets`: it reports the line of a syntax error, and it keeps
    # each record as written (Arrow would unify the records' schemas, turning absent fields into nulls).
    text = _decode(path.read_bytes(), path.name)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several top-level values: JSON Lines in a .json file
            return _parse_jsonl(text, path.name)
        raise DataError(
            f"{path.name} line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})"
        ) from None
    items = value.get("data") if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise DataError(f'{path.name}: expected a JSON array of examples or an object with a "data" array')
    return [_as_record(item, f"{path.name} item {number}") for number, item in enumerate(items, 1)]


def _as_record(value: Any, location: str) -> Record:
    if not isinstance(value, dict):
        raise DataError(f"{location}: expected a JSON object, got {json_type(value)}")
    return Record(value, location)


def _read_csv(path: Path) -> list[Record]:
    text = _decode(path.read_bytes(), path.name)
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    if not header or next(reader, None) is None:  # `datasets` refuses a file without data rows
        return []
    # Every column as a string, and empty cells as "": pandas' type inference would turn a
    # completion "42" into 42.0 and a prompt "NA" into a missing value.
    features = {column: "string" for column in header}
    rows = _load_with_datasets("csv", path, features=features, keep_default_na=False, na_filter=False)
    return [_columnar_record(row, f"{path.name} row {number}") for number, row in enumerate(rows, 1)]


def _read_parquet(path: Path) -> list[Record]:
    rows = _load_with_datasets("parquet", path)
    return [_columnar_record(row, f"{path.name} row {number}") for number, row in enumerate(rows, 1)]


def _load_with_datasets(builder: str, path: Path, features: dict[str, str] | None = None,
                        **options: Any) -> list[dict[str, Any]]:
    """Rows of a local CSV/Parquet file read by `datasets`' packaged builder (local only, no hub)."""
    import datasets

    datasets.disable_progress_bars()
    if features is not None:
        options["features"] = datasets.Features(
            {name: datasets.Value(kind) for name, kind in features.items()}
        )
    # The rows are kept in memory, so the builder's cache (lock and Arrow files for every file read)
    # goes to a temporary folder instead of piling up in ~/.cache/huggingface.
    with tempfile.TemporaryDirectory(prefix="lorakit-data-") as cache_dir:
        try:
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir,
                                            keep_in_memory=True, **options)
        except (
            Exception
        ) as error:  # pyarrow/pandas parse errors, wrapped by datasets in DatasetGenerationError
            cause = error.__cause__ or error
            reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            kind = {"csv": "CSV", "parquet": "Parquet"}[builder]
            raise DataError(f"{path.name}: not a readable {kind} file ({reason})") from error
        return dataset.to_list()


def _columnar_record(row: dict[str, Any], location: str) -> Record:
    """A CSV/Parquet row as a record: nulls dropped, message lists stored as JSON strings decoded."""
    # Arrow gives every row every column (and every message every struct field), filling the gaps
    # with null; a null therefore means "absent".
    fields = {key: _drop_nulls(value) for key, value in row.items() if value is not None}
    if isinstance(fields.get("messages"), str):
        try:
            fields["messages"] = json.loads(fields["messages"])
        except json.JSONDecodeError as error:
            raise DataError(
                f'{location}: column "messages" is not valid JSON ({error.msg} at column {error.colno})'
            ) from None
    for key in ("prompt", "completion", "chosen", "rejected"):  # the last two: preference data (DPO)
        # A string that parses as a list of {"role": ...} objects is a message list; any other string
        # (including one that merely starts with "[") is the prompt or answer text itself.
        value = fields.get(key)
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                decoded = json.loads(value)
            except json.JSONDecodeError:
                continue
            if (
                isinstance(decoded, list)
                and decoded
                and all(isinstance(m, dict) and "role" in m for m in decoded)
            ):
                fields[key] = decoded
    return Record(fields, location)


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, list):
        return [_drop_nulls(item) for item in value]
    if isinstance(value, dict):
        return {key: _drop_nulls(item) for key, item in value.items() if item is not None}
    return value


# ------------------------------------------------------------------------------ prompts, answers, splits


def prompt_messages(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conversation before its final assistant turn, to prompt generation; [] for `text` records."""
    conv = conversation(record)
    if conv is None:
        return []
    messages = conv[0]
    return messages[: _last_assistant(messages)]


def reference_answer(record: Mapping[str, Any]) -> str | None:
    """The final assistant turn's content (the answer exact match compares with); None for `text`."""
    conv = conversation(record)
    if conv is None:
        return None
    messages = conv[0]
    return messages[_last_assistant(messages)]["content"]


def _last_assistant(messages: list[dict[str, Any]]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def bundled_dataset_path(split: str) -> Path:
    """The bundled date-normalisation demo file for "train", "validation" or "test"."""
    if split not in SPLITS:
        raise ValueError(f"bundled_dataset_path: unknown split {split!r} (expected {', '.join(SPLITS)})")
    return BUNDLED_DIR / f"demo_{split}.jsonl"


def split_validation(records: Sequence[Record], fraction: float, seed: int,
                     source: str = "data") -> tuple[list[Record], list[Record]]:
    """(train, validation): a seeded random `fraction` of the records held out, both kept in file order."""
    if not 0 < fraction < 1:
        raise ValueError(f"split_validation: fraction must be in (0, 1), got {fraction}")
    count = max(1, round(len(records) * fraction))
    if count >= len(records):
        raise DataError(
            f"{source}: {len(records)} example(s) are too few to hold out validation_fraction={fraction}"
        )
    held_out = set(random.Random(seed).sample(range(len(records)), count))
    train = [r for i, r in enumerate(records) if i not in held_out]
    validation = [r for i, r in enumerate(records) if i in held_out]
    return train, validation


# ------------------------------------------------------------------------------------------- datasets


def build_datasets(train_path: str | Path, tokenizer, *, validation_path: str | Path | None = None,
                   validation_fraction: float = 0.0, seed: int = 0, max_seq_len: int = 512,
                   train_on_prompt: bool = False, packing: bool = False,
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]]:
    """(training examples, validation examples or None, stats) ready for `collate`.

    Validation comes from `validation_path` if given, else from holding out `validation_fraction`
    of the training file (seeded by `seed`), else there is none. With `packing`, training examples
    are packed into blocks of up to `max_seq_len` tokens (see `pack_examples`); validation examples
    never are, so validation loss stays comparable across settings.

    stats: format; train_rows and validation_rows (examples kept, before packing); truncated_rows
    (training + validation examples cut to max_seq_len); dropped_rows (examples left with no learned
    token after truncation, which are skipped); tokens and supervised_tokens (training, after
    truncation); packed_blocks (None without packing).
    """
    source = Path(train_path).name
    train_records = load_records(train_path, validate=False)
    file_format = validate_records(train_records, source)
    validation_records: list[Record] | None = None
    if validation_path is not None:
        validation_records = load_records(validation_path)
    elif validation_fraction > 0:
        train_records, validation_records = split_validation(train_records, validation_fraction, seed, source)

    options = {"tokenizer": tokenizer, "max_seq_len": max_seq_len, "train_on_prompt": train_on_prompt}
    train, train_truncated, train_dropped = _encode_all(train_records, **options)
    if not train:
        raise DataError(f"{source}: no example has a token to learn within max_seq_len={max_seq_len} "
                        f"(raise max_seq_len)")
    validation, val_truncated, val_dropped = (None, 0, 0) if validation_records is None \
        else _encode_all(validation_records, **options)
    stats = {
        "format": file_format,
        "train_rows": len(train),
        "validation_rows": len(validation) if validation is not None else 0,
        "truncated_rows": train_truncated + val_truncated,
        "dropped_rows": train_dropped + val_dropped,
        "tokens": sum(len(e["input_ids"]) for e in train),
        "supervised_tokens": sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in train),
        "packed_blocks": None,
    }
    if packing:
        train = pack_examples(train, max_seq_len)
        stats["packed_blocks"] = len(train)
    return train, validation, stats


def _encode_all(records: Sequence[Record], **options: Any) -> tuple[list[dict[str, Any]], int, int]:
    """(examples with at least one learned token, truncated count, dropped count)."""
    examples, truncated, dropped = [], 0, 0
    for record in records:
        example = encode_example(record, **options)
        truncated += example["truncated"]
        # Labels are shifted in the loss, so the first position never counts; an example without a
        # learned token adds nothing to training and would make a batch of such examples divide by 0.
        if all(label == IGNORE_INDEX for label in example["labels"][1:]):
            dropped += 1
            _log.warning("%s: no token to learn within max_seq_len=%d; skipped", record.location,
                         options["max_seq_len"])
            continue
        examples.append(example)
    return examples, truncated, dropped
