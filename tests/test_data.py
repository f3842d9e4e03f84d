"""Data pipeline: reading every format from every file type, validation errors, loss masks on the real
SmolLM2 chat template, truncation, packing, collation, validation splits and scoring."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from lorakit.errors import DataError
from lorakit.train.data import (
    build_datasets,
    load_records,
    prompt_messages,
    reference_answer,
    split_validation,
)
from lorakit.train.formats import validate_records
from lorakit.train.scoring import exact_match, normalise_answer
from lorakit.train.tokenize import IGNORE_INDEX, collate, encode_example, pack_examples

END = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path):
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture
def fresh_tokenizer(default_model_dir: Path):
    """A tokenizer this test may modify (e.g. its chat template)."""
    return AutoTokenizer.from_pretrained(default_model_dir)


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


SAMPLES = {
    "messages": [
        {"messages": chat(("system", "Be brief."), ("user", "Capital of France?"), ("assistant", "Paris"))},
        {"messages": chat(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"))},
    ],
    "prompt_completion_strings": [
        {"prompt": "Capital of France?", "completion": "Paris"},
        {"prompt": "2+2?", "completion": "4"},  # "4" must stay a string in CSV
    ],
    "prompt_completion_messages": [
        {"prompt": chat(("user", "Capital of France?")), "completion": chat(("assistant", "Paris"))},
        {"prompt": chat(("user", "2+2?")), "completion": chat(("assistant", "4"))},
    ],
    "text": [{"text": "The quick brown fox."}, {"text": "Jumps over the lazy dog."}],
}
FILE_FORMAT = {"messages": "messages", "prompt_completion_strings": "prompt_completion",
               "prompt_completion_messages": "prompt_completion", "text": "text"}
LOCATION = {"jsonl": "line", "json": "item", "parquet": "row", "csv": "row"}


def write(path: Path, records: list[dict]) -> Path:
    """`records` in the file type given by `path`'s suffix (message lists as JSON strings in CSV)."""
    kind = path.suffix[1:]
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    elif kind == "parquet":
        datasets.Dataset.from_list(records).to_parquet(str(path))
    elif kind == "csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            for r in records:
                writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()})
    return path


def labelled_runs(tokenizer, example: dict) -> list[str]:
    """The decoded text of each contiguous run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


# ------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_every_format_reads_from_every_file_type(tmp_path, tokenizer, kind, sample):
    path = write(tmp_path / f"data.{kind}", SAMPLES[sample])
    records = load_records(path)
    assert records == SAMPLES[sample]
    assert [r.location for r in records] == [f"data.{kind} {LOCATION[kind]} {n}" for n in (1, 2)]
    assert all("location" not in r for r in records)  # never leaks into what is tokenised
    assert validate_records(records, path.name) == FILE_FORMAT[sample]
    example = encode_example(records[0], tokenizer, max_seq_len=256)
    expected = "The quick brown fox." + END if sample == "text" else "Paris" + END
    assert "".join(labelled_runs(tokenizer, example)) == expected


def test_json_object_with_data_array_and_json_lines_in_a_json_file(tmp_path):
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": SAMPLES["text"]}))
    assert load_records(wrapped) == SAMPLES["text"]
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in SAMPLES["text"]))
    assert [r.location for r in load_records(lines)] == ["lines.json line 1", "lines.json line 2"]


def test_records_pickle_with_their_location(tmp_path):
    record = load_records(write(tmp_path / "data.jsonl", SAMPLES["text"]))[1]
    copy = pickle.loads(pickle.dumps(record))
    assert copy == record and copy.location == "data.jsonl line 2"


def test_prompt_messages_and_reference_answer():
    record = {"messages": chat(("system", "s"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"),
                               ("assistant", "a2"))}
    assert prompt_messages(record) == record["messages"][:4]
    assert reference_answer(record) == "a2"
    pair = SAMPLES["prompt_completion_strings"][0]
    assert prompt_messages(pair) == chat(("user", "Capital of France?"))
    assert reference_answer(pair) == "Paris"
    assert prompt_messages({"text": "x"}) == [] and reference_answer({"text": "x"}) is None


# ---------------------------------------------------------------------------------------- validation

MSG = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
BAD_DATA = [
    ("data.jsonl", b"", "data.jsonl: no examples"),
    ("data.jsonl", b"\n  \n", "data.jsonl: no examples"),
    (
        "data.jsonl",
        b'{"text": "a"}\n{"text": "b",}\n',
        "data.jsonl line 2: invalid JSON (Expecting property name enclosed in double quotes at column 14)",
    ),
    ("data.jsonl", b'{"text": "a"}\n[1, 2]\n', "data.jsonl line 2: expected a JSON object, got array"),
    (
        "data.jsonl",
        b'{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n{"text": "caf\xe9"}\n',
        "data.jsonl line 4: not valid UTF-8",
    ),
    (
        "data.jsonl",
        (MSG + "\n" + MSG + '\n{"msgs": []}\n').encode(),
        'data.jsonl line 3: missing field "messages" (expected "messages", "prompt"+"completion", or "text")',
    ),
    (
        "data.jsonl",
        (MSG + '\n{"text": "b"}\n').encode(),
        'data.jsonl line 2: uses "text" but data.jsonl line 1 uses "messages" (one format per file)',
    ),
    (
        "data.jsonl",
        b'{"messages": "hi"}\n',
        'data.jsonl line 1: "messages" must be a non-empty list of {"role", "content"} objects, got string',
    ),
    (
        "data.jsonl",
        b'{"messages": []}\n',
        'data.jsonl line 1: "messages" must be a non-empty list of {"role", "content"} objects, got an empty '
        'list',
    ),
    (
        "data.jsonl",
        b'{"messages": ["hi"]}\n',
        'data.jsonl line 1: message 1: expected an object with "role" and "content", got string',
    ),
    (
        "data.jsonl",
        b'{"messages": [{"content": "hi"}]}\n',
        'data.jsonl line 1: message 1: missing field "role"',
    ),
    (
        "data.jsonl",
        b'{"messages": [{"role": "user"}]}\n',
        'data.jsonl line 1: message 1: missing field "content"',
    ),
    (
        "data.jsonl",
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}\n',
        'data.jsonl line 1: message 2: unknown role "bot" (expected system, user, assistant or tool)',
    ),
    (
        "data.jsonl",
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}\n',
        'data.jsonl line 1: message 2: "content" must be a string, got number',
    ),
    (
        "data.jsonl",
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}\n',
        "data.jsonl line 1: message 2: empty assistant message",
    ),
    (
        "data.jsonl",
        b'{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}\n',
        "data.jsonl line 1: no assistant message to learn from",
    ),
    ("data.jsonl", b'{"prompt": "a"}\n', 'data.jsonl line 1: missing field "completion"'),
    ("data.jsonl", b'{"completion": "a"}\n', 'data.jsonl line 1: missing field "prompt"'),
    ("data.jsonl", b'{"prompt": "a", "completion": " \\n"}\n', "data.jsonl line 1: empty completion"),
    (
        "data.jsonl",
        b'{"prompt": "a", "completion": 3}\n',
        'data.jsonl line 1: "completion" must be a string or a list of messages, got number',
    ),
    (
        "data.jsonl",
        b'{"prompt": "a", "completion": null}\n',
        'data.jsonl line 1: "completion" must be a string or a list of messages, got null',
    ),
    (
        "data.jsonl",
        b'{"prompt": "a", "completion": [{"role": "user", "content": "b"}]}\n',
        "data.jsonl line 1: completion has no assistant message",
    ),
    (
        "data.jsonl",
        b'{"prompt": [{"role": "user", "content": 1}], "completion": "b"}\n',
        'data.jsonl line 1: prompt message 1: "content" must be a string, got number',
    ),
    ("data.jsonl", b'{"text": ""}\n', "data.jsonl line 1: empty text"),
    ("data.jsonl", b'{"text": ["a"]}\n', 'data.jsonl line 1: "text" must be a string, got array'),
    (
        "data.json",
        b'[{"text": "a"},\n {"text": "b"}\n {"text": "c"}]',
        "data.json line 3: invalid JSON (Expecting ',' delimiter at column 2)",
    ),
    ("data.json", b'[{"text": "a"}, "b"]', "data.json item 2: expected a JSON object, got string"),
    ("data.json", b'[{"text": "a"}, {"text": 1}]', 'data.json item 2: "text" must be a string, got number'),
    (
        "data.json",
        b'{"rows": []}',
        'data.json: expected a JSON array of examples or an object with a "data" array',
    ),
    ("data.json", b"[]", "data.json: no examples"),
    ("data.json", b'[\n{"text": "a"},\n{"text": "\xff"}\n]', "data.json line 3: not valid UTF-8"),
    ("data.csv", b"text\n", "data.csv: no examples"),
    ("data.csv", b"prompt,completion\na,b\nc,\n", "data.csv row 2: empty completion"),
    ("data.csv", b"text\nfine\n\xe9t\xe9\n", "data.csv line 3: not valid UTF-8"),
    (
        "data.csv",
        b'messages\n"[{""role"": ""user"",}]"\n',
        'data.csv row 1: column "messages" is not valid JSON (Expecting property name enclosed in double '
        'quotes at column 18)',
    ),
    (
        "data.csv",
        b"question,answer\nq,a\n",
        'data.csv row 1: missing field "messages" (expected "messages", "prompt"+"completion", or "text")',
    ),
    (
        "data.txt",
        b"hello",
        "data.txt: unsupported file type '.txt' (expected .jsonl, .json, .parquet or .csv)",
    ),
]


@pytest.mark.parametrize(("name", "content", "expected"), BAD_DATA, ids=[m for _, _, m in BAD_DATA])
def test_bad_data_fails_with_one_line_naming_file_and_line(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_records(tmp_path / name)
    assert str(caught.value) == expected


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=r"^nope\.jsonl: no such file$"):
        load_records(Path("nope.jsonl"))
    (tmp_path / "data.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"^data\.parquet: not a readable Parquet file \(.*magic bytes"):
        load_records(tmp_path / "data.parquet")


def test_bad_data_fails_in_build_datasets_before_any_tokenizer_use(tmp_path):
    (tmp_path / "data.jsonl").write_bytes(b'{"text": "a"}\n{"text": 2}\n')
    with pytest.raises(DataError, match=r'^data\.jsonl line 2: "text" must be a string, got number$'):
        build_datasets(tmp_path / "data.jsonl", tokenizer=None)


def test_parquet_nulls_and_json_string_columns(tmp_path):
    # Arrow unifies the message structs: the first message gets name=None, which must not reach the template.
    rows = [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo", "name": "bot"},
            ]
        },
        {"messages": json.dumps(chat(("user", "a"), ("assistant", "b")))},
    ]
    write(tmp_path / "a.parquet", rows[:1])
    assert load_records(tmp_path / "a.parquet")[0]["messages"][0] == {"role": "user", "content": "hi"}
    datasets.Dataset.from_list(rows[1:]).to_parquet(str(tmp_path / "b.parquet"))
    assert load_records(tmp_path / "b.parquet")[0]["messages"] == chat(("user", "a"), ("assistant", "b"))
    # A CSV prompt that merely looks like JSON stays text.
    (tmp_path / "c.csv").write_text('prompt,completion\n"[1, 2] sorted?",yes\n')
    assert load_records(tmp_path / "c.csv")[0]["prompt"] == "[1, 2] sorted?"


# --------------------------------------------------------------------------------------- loss masks


def test_loss_mask_token_by_token_on_smollm2_template(tokenizer):
    record = {
        "messages": chat(("system", "Be brief."), ("user", "Capital of France?"), ("assistant", "Paris"))
    }
    example = encode_example(record, tokenizer, max_seq_len=256)
    ids = example["input_ids"]
    assert (
        ids == tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=True)["input_ids"]
    )
    # Independently: the labelled tokens are exactly those after the last "<|im_start|>assistant\n"
    # up to and including the next <|im_end|>.
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    start = max(i for i in range(len(ids)) if ids[i:i + len(header)] == header) + len(header)
    stop = ids.index(tokenizer.convert_tokens_to_ids(END), start) + 1
    expected = [IGNORE_INDEX] * start + ids[start:stop] + [IGNORE_INDEX] * (len(ids) - stop)
    assert example["labels"] == expected
    assert tokenizer.decode(ids[start:stop]) == "Paris" + END
    assert tokenizer.decode(ids[stop:]) == "\n"  # the template's trailing newline is not learned
    assert example["truncated"] is False


def test_multi_turn_learns_every_assistant_turn_only(tokenizer):
    record = {"messages": chat(("user", "Weather?"), ("assistant", "Let me check."), ("tool", "Sunny, 21C"),
                               ("assistant", "Sunny and 21 degrees."), ("user", "Thanks!"),
                               ("assistant", "You're welcome."))}
    example = encode_example(record, tokenizer, max_seq_len=512)
    assert labelled_runs(tokenizer, example) == ["Let me check." + END, "Sunny and 21 degrees." + END,
                                                 "You're welcome." + END]
    # The default system prompt was injected by the template and is masked like every other non-assistant
    # turn.
    assert tokenizer.decode(example["input_ids"]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant"
    )


def test_prompt_completion_learns_only_the_completion(tokenizer):
    few_shot = {"prompt": chat(("user", "1+1?"), ("assistant", "2"), ("user", "2+2?")),
                "completion": chat(("assistant", "4"))}
    assert labelled_runs(tokenizer, encode_example(few_shot, tokenizer, 256)) == ["4" + END]
    # A string pair is one user turn and one assistant turn: the same tokens as the chat record.
    strings = encode_example({"prompt": "2+2?", "completion": "4"}, tokenizer, 256)
    as_chat = encode_example({"messages": chat(("user", "2+2?"), ("assistant", "4"))}, tokenizer, 256)
    assert strings == as_chat


def test_text_learns_every_token_and_ends_with_eos(tokenizer):
    example = encode_example({"text": "Once upon a time"}, tokenizer, 256)
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"]) == "Once upon a time" + tokenizer.eos_token


def test_train_on_prompt_learns_everything(tokenizer):
    record = SAMPLES["messages"][0]
    example = encode_example(record, tokenizer, 256, train_on_prompt=True)
    assert example["labels"] == example["input_ids"] == encode_example(record, tokenizer, 256)["input_ids"]


def test_boundary_token_merged_across_turn_start_is_learned(tokenizer):
    # "\n" ending the generation prompt merges with the content's leading "\n": the prefix
    # tokenisation is not a prefix of the full one, and the straddling token is learned.
    record = {"messages": chat(("user", "hi"), ("assistant", "\nhello"))}
    example = encode_example(record, tokenizer, 256)
    assert (
        example["input_ids"]
        == tokenizer(
            tokenizer.apply_chat_template(record["messages"], tokenize=False), add_special_tokens=False
        )["input_ids"]
    )
    (run,) = labelled_runs(tokenizer, example)
    assert run.endswith("\nhello" + END) and len(run) <= len("\n\nhello" + END)


def test_template_that_is_not_prefix_stable_falls_back_to_search(fresh_tokenizer):
    # The header counts the turns, so rendering a prefix of the conversation changes earlier text.
    fresh_tokenizer.chat_template = (
        "<|im_start|>system\n{{ messages | length }} turns<|im_end|>\n{% for m in messages %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    record = {
        "messages": chat(("user", "Say ok"), ("assistant", "ok"), ("user", "Again"), ("assistant", "ok"))
    }
    assert labelled_runs(fresh_tokenizer, encode_example(record, fresh_tokenizer, 256)) == ["ok" + END] * 2


def test_template_errors_and_missing_template_are_data_errors(tmp_path, fresh_tokenizer):
    record = load_records(write(tmp_path / "data.jsonl", SAMPLES["messages"]))[1]
    fresh_tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match=r"^data\.jsonl line 2: the chat template rejected this conversation "
                                        r"\(roles must alternate\)$"):
        encode_example(record, fresh_tokenizer, 256)
    fresh_tokenizer.chat_template = None
    with pytest.raises(
        DataError, match=r"^data\.jsonl line 2: chat data needs a tokenizer with a chat template"
    ):
        encode_example(record, fresh_tokenizer, 256)
    # String pairs fall back to raw text: prompt + completion + EOS, the completion and EOS learned.
    example = encode_example({"prompt": "2+2=", "completion": "4"}, fresh_tokenizer, 256)
    assert fresh_tokenizer.decode(example["input_ids"]) == "2+2=4" + fresh_tokenizer.eos_token
    assert labelled_runs(fresh_tokenizer, example) == ["4" + fresh_tokenizer.eos_token]


# --------------------------------------------------------------------- truncation, packing, collate


def test_truncation_keeps_the_beginning_and_is_counted(tmp_path, tokenizer):
    long = "word " * 200
    records = [{"prompt": "Short?", "completion": long}, {"prompt": "Hi", "completion": "Yo"},
               {"prompt": long, "completion": "Lost"}]
    full = encode_example(records[0], tokenizer, 10_000)
    cut = encode_example(records[0], tokenizer, 64)
    assert cut["truncated"] and len(cut["input_ids"]) == 64
    assert cut["input_ids"] == full["input_ids"][:64] and cut["labels"] == full["labels"][:64]
    train, validation, stats = build_datasets(
        write(tmp_path / "data.jsonl", records), tokenizer, max_seq_len=64
    )
    # The third example's answer lies beyond the cut: it is truncated and dropped (nothing to learn).
    assert (stats["train_rows"], stats["truncated_rows"], stats["dropped_rows"]) == (2, 2, 1)
    assert validation is None and stats["validation_rows"] == 0 and stats["format"] == "prompt_completion"
    assert stats["tokens"] == sum(len(e["input_ids"]) for e in train)
    assert stats["supervised_tokens"] == sum(sum(x != IGNORE_INDEX for x in e["labels"][1:]) for e in train)
    write(tmp_path / "lost.jsonl", records[2:])
    with pytest.raises(
        DataError, match=r"^lost\.jsonl: no example has a token to learn within max_seq_len=64"
    ):
        build_datasets(tmp_path / "lost.jsonl", tokenizer, max_seq_len=64)


def test_packing_keeps_every_token_and_label():
    lengths = (10, 30, 12, 40, 3, 25)
    examples, first = [], 0
    for k, n in enumerate(lengths):  # distinct ids; odd examples learn everything, even ones their 2nd half
        ids = list(range(first, first + n))
        labels = list(ids) if k % 2 else [IGNORE_INDEX] * (n // 2) + ids[n // 2:]
        examples.append({"input_ids": ids, "labels": labels, "truncated": False})
        first += n
    blocks = pack_examples(examples, max_seq_len=48)
    # Next-fit: 10+30 | 12 (12+40 > 48) | 40+3 | 25 (43+25 > 48)
    assert [len(b["input_ids"]) for b in blocks] == [40, 12, 43, 25]
    assert sum((b["input_ids"] for b in blocks), []) == sum((e["input_ids"] for e in examples), [])
    # Each example's labels are kept, except its first token (which would be predicted across examples).
    assert sum((b["labels"] for b in blocks), []) == sum(
        ([IGNORE_INDEX, *e["labels"][1:]] for e in examples), []
    )
    assert blocks[0]["labels"][10] == IGNORE_INDEX and blocks[0]["labels"][11] == examples[1]["input_ids"][1]
    assert blocks[0]["position_ids"] == list(range(10)) + list(range(30))
    with pytest.raises(ValueError, match="more than max_seq_len=8"):
        pack_examples(examples, max_seq_len=8)


def test_build_datasets_with_packing(tmp_path, tokenizer):
    path = write(tmp_path / "data.jsonl", [{"messages": chat(("user", f"Q{i}"), ("assistant", f"A{i}"))}
                                           for i in range(20)])
    plain, _, plain_stats = build_datasets(path, tokenizer, max_seq_len=128)
    packed, _, stats = build_datasets(path, tokenizer, max_seq_len=128, packing=True)
    assert stats["packed_blocks"] == len(packed) < len(plain) and plain_stats["packed_blocks"] is None
    assert sum(len(b["input_ids"]) for b in packed) == stats["tokens"] == plain_stats["tokens"]
    assert sum(sum(x != IGNORE_INDEX for x in b["labels"]) for b in packed) == stats["supervised_tokens"]


def test_collate_right_pads(tokenizer):
    a = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "truncated": False}
    b = {"input_ids": [8], "labels": [8], "truncated": True}
    batch = collate([a, b], pad_token_id=tokenizer.pad_token_id)
    pad = tokenizer.pad_token_id
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert collate([b, a], pad_token_id=None)["input_ids"].tolist() == [[8, 0, 0], [5, 6, 7]]
    packed = pack_examples([a, b], max_seq_len=4) + pack_examples([b], max_seq_len=4)
    batch = collate(packed, pad_token_id=pad)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 0, 1, 2]]
    assert batch["labels"].tolist()[1] == [IGNORE_INDEX] * 4


# --------------------------------------------------------------------------------- validation split


def test_validation_fraction_is_deterministic_by_seed(tmp_path, tokenizer):
    records = load_records(write(tmp_path / "data.jsonl", [{"text": f"row {i}"} for i in range(50)]))
    train, held = split_validation(records, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert sorted(r["text"] for r in train + held) == sorted(r["text"] for r in records)
    assert (train, held) == split_validation(records, 0.2, seed=3)
    assert held != split_validation(records, 0.2, seed=4)[1]
    assert [r.location for r in held] == sorted((r.location for r in held), key=lambda s: int(s.split()[-1]))
    with pytest.raises(DataError, match=r"^data\.jsonl: 1 example\(s\) are too few"):
        split_validation(records[:1], 0.5, seed=0, source="data.jsonl")
    train_examples, val_examples, stats = build_datasets(
        tmp_path / "data.jsonl", tokenizer, validation_fraction=0.2, seed=3
    )
    assert (stats["train_rows"], stats["validation_rows"], len(val_examples)) == (40, 10, 10)
    expected = [encode_example(r, tokenizer, 512)["input_ids"] for r in held]
    assert [e["input_ids"] for e in val_examples] == expected


def test_validation_file_wins_over_fraction(tmp_path, tokenizer):
    train_path = write(tmp_path / "train.jsonl", [{"text": f"row {i}"} for i in range(10)])
    val_path = write(tmp_path / "val.csv", [{"text": "held out"}])
    train, validation, stats = build_datasets(
        train_path, tokenizer, validation_path=val_path, validation_fraction=0.5
    )
    assert (stats["train_rows"], stats["validation_rows"]) == (10, 1)
    assert tokenizer.decode(validation[0]["input_ids"]) == "held out" + tokenizer.eos_token


# ------------------------------------------------------------------------------------------ scoring


def test_normalise_answer_and_exact_match():
    assert normalise_answer("  2021-03-05<|im_end|>\n") == "2021-03-05"
    assert normalise_answer("2021-03-05 <|im_end|><|im_end|>") == "2021-03-05"
    assert normalise_answer("Paris.") == "Paris."  # nothing else is forgiven
    assert exact_match(
        ["2021-03-05\n", "2021-3-5", " x"], ["2021-03-05", "2021-03-05", "x"]
    ) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])
