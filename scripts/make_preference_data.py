"""Generate lorakit's bundled preference pairs (for `lorakit dpo`) from the date-normalisation demo data.

    .venv/bin/python scripts/make_preference_data.py  # rewrites src/lorakit/data/demo_preference_*.jsonl
    .venv/bin/python scripts/make_preference_data.py --check  # exit 1 if the committed files differ

Each pair keeps a demo prompt (system + user messages, as in demo_{train,validation}.jsonl) and prefers
the answer the instruction asks for, the bare ISO date, over a plausible wrong one:

    verbose     "The date is March 5, 2021."                 (ignores "Reply with the date only")
    chatty      "Sure! The normalized date is 2021-03-05."   (right date, wrong format)
    swapped     "2021-05-03"                                 (day and month exchanged; only when both ≤ 12)
    us_slashes  "03/05/2021"                                 (month-first slashes instead of ISO)
    unpadded    "2021-3-5"                                   (no zero padding; only when one part is < 10)

Kinds cycle in a seeded shuffled order, so every split covers every kind about evenly; a kind that does
not apply to a date (swapped when the day is above 12 or equals the month, unpadded for 2021-11-12) falls
back to us_slashes. Deterministic: reads the committed demo files, seeded `random.Random`, fixed English
month names, no network.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
from pathlib import Path

SEED = 20240306
DATA_DIR = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "data"
SPLITS = {"train": ("demo_train.jsonl", 400), "validation": ("demo_validation.jsonl", 100)}
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
KINDS = ("verbose", "chatty", "swapped", "us_slashes", "unpadded")


def rejected_answer(kind: str, date: dt.date) -> str:
    """The wrong answer of `kind` for `date` (us_slashes where the kind does not apply)."""
    if kind == "verbose":
        return f"The date is {MONTHS[date.month - 1]} {date.day}, {date.year}."
    if kind == "chatty":
        return f"Sure! The normalized date is {date.isoformat()}."
    if kind == "swapped" and date.day <= 12 and date.day != date.month:
        return f"{date.year:04d}-{date.day:02d}-{date.month:02d}"
    if kind == "unpadded" and (date.month < 10 or date.day < 10):
        return f"{date.year}-{date.month}-{date.day}"
    return f"{date.month:02d}/{date.day:02d}/{date.year:04d}"


def make_pairs(demo_rows: list[dict], count: int, rng: random.Random) -> list[dict]:
    """The first `count` demo rows as preference pairs."""
    pairs = []
    order: list[str] = []
    for row in demo_rows[:count]:
        if not order:
            order = list(KINDS)
            rng.shuffle(order)
        *prompt, answer = row["messages"]
        date = dt.date.fromisoformat(answer["content"])
        pairs.append(
            {"prompt": prompt, "chosen": answer["content"], "rejected": rejected_answer(order.pop(), date)}
        )
    return pairs


def generate(data_dir: Path = DATA_DIR) -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    splits = {}
    for split, (source, count) in SPLITS.items():
        lines = (data_dir / source).read_text(encoding="utf-8").splitlines()
        splits[split] = make_pairs([json.loads(line) for line in lines], count, rng)
    return splits


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DATA_DIR, help="output folder (default: the package data)"
    )
    parser.add_argument("--check", action="store_true", help="only compare with the files in --out")
    args = parser.parse_args(argv)
    stale = []
    for split, rows in generate().items():
        path = args.out / f"demo_preference_{split}.jsonl"
        text = to_jsonl(rows)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {len(rows)} pairs to {path}")
    if stale:
        print(f"out of date: {', '.join(stale)} (run scripts/make_preference_data.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
