"""The bundled date-normalisation demo dataset: sizes, uniqueness, correct answers, short rows, and a
base model that fails it (so that the demo's LoRA run has something to show).

    .venv/bin/pytest -q tests/test_demo_data.py               # everything, base exact match included (~1 min)
    .venv/bin/pytest -q tests/test_demo_data.py -m "not slow" # data checks only (seconds)
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from dateutil import parser as dateparser  # installed with matplotlib, a lorakit dependency
from transformers import AutoTokenizer

from lorakit.train.data import bundled_dataset_path, load_records, prompt_messages, reference_answer
from lorakit.train.scoring import exact_match
from lorakit.train.tokenize import IGNORE_INDEX, encode_example

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_data.py"
SPLITS = ("train", "validation", "test")
BASE_EXACT_MATCH_CEILING = 0.20


def load_generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator():
    return load_generator()


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {split: load_records(bundled_dataset_path(split)) for split in SPLITS}


def date_input(record: dict) -> str:
    """The messy date: the user message after the fixed instruction."""
    return record["messages"][1]["content"].split("\n\n", 1)[1]


def test_split_sizes_and_shape(splits, generator):
    assert {split: len(rows) for split, rows in splits.items()} == generator.SPLIT_SIZES
    for rows in splits.values():
        for record in rows:
            assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
            assert record["messages"][1]["content"].startswith(generator.INSTRUCTION + "\n\n")


def test_no_input_appears_twice_anywhere(splits):
    inputs = [date_input(r) for rows in splits.values() for r in rows]
    assert len(inputs) == len(set(inputs))


def test_committed_files_match_the_generator(generator):
    for split, rows in generator.generate().items():
        assert bundled_dataset_path(split).read_text(encoding="utf-8") == generator.to_jsonl(rows)


def test_every_answer_is_the_iso_date_of_its_input(splits, generator):
    weekdays = {name: number for number, name in enumerate(generator.WEEKDAYS)}
    for rows in splits.values():
        for record in rows:
            text, answer = date_input(record), reference_answer(record)
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", answer)
            date = dt.date.fromisoformat(answer)
            # Independently of the generator: dateutil, told the stated day/month convention.
            hint = re.search(r" \((US|UK)\)$", text)
            bare = text[: hint.start()] if hint else text
            parsed = dateparser.parse(bare, fuzzy=True, dayfirst=bool(hint and hint.group(1) == "UK")).date()
            assert parsed == date, text
            weekday = bare.split(",")[0]
            if weekday in weekdays:  # dateutil ignores a weekday that contradicts the date
                assert date.weekday() == weekdays[weekday], text


def test_every_format_is_in_every_split(splits, generator):
    for split, rows in splits.items():
        used = set()
        for record in rows:
            date, text = dt.date.fromisoformat(reference_answer(record)), date_input(record)
            used.update(name for name, (render, _) in generator.FORMATS.items() if render(date) == text)
        assert used == set(generator.FORMATS), split


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path):
    return AutoTokenizer.from_pretrained(default_model_dir)


def test_rows_are_short_and_only_the_date_is_learned(splits, tokenizer):
    for rows in splits.values():
        for record in rows:
            example = encode_example(record, tokenizer, max_seq_len=10_000)
            assert len(example["input_ids"]) < 80
            learned = [
                t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX
            ]
            assert tokenizer.decode(learned) == reference_answer(record) + "<|im_end|>"


@pytest.mark.slow
def test_base_model_fails_the_task(default_model_dir, tokenizer):
    """Greedy answers of the untuned model on the test split: exact match must stay <= 20 % (measured 7 %)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_dir).eval()
    records = load_records(bundled_dataset_path("test"))
    prompts = [tokenizer.apply_chat_template(prompt_messages(r), tokenize=False, add_generation_prompt=True)
               for r in records]
    answers = []
    with torch.no_grad():
        for start in range(0, len(prompts), 25):
            batch = tokenizer(
                prompts[start : start + 25],
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=False,
            )
            output = model.generate(
                **batch, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            answers += tokenizer.batch_decode(
                output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
            )
    score = exact_match(answers, [reference_answer(r) for r in records])
    print(json.dumps({"base_exact_match": score, "rows": len(records)}))
    assert score <= BASE_EXACT_MATCH_CEILING
