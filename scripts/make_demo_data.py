"""Generate lorakit's bundled demo dataset: messy human-written dates -> ISO 8601 (YYYY-MM-DD).

    .venv/bin/python scripts/make_demo_data.py            # rewrites src/lorakit/data/demo_*.jsonl
    .venv/bin/python scripts/make_demo_data.py --check    # exit 1 if the committed files differ

The task is chosen so that the base SmolLM2-135M-Instruct mostly fails (it paraphrases, keeps the
input's order or invents digits) while a short LoRA run learns it: every input format is regular and
unambiguous. Numeric day/month orders are ambiguous in general, so those inputs always carry an explicit
hint ("(US)" = month first, "(UK)" = day first); two-digit years are only used for 2000-2029.

Deterministic: a seeded `random.Random`, English month and weekday names from fixed tables (never the
process locale), and no network. Inputs are unique across all three splits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

SEED = 20240305
SPLIT_SIZES = {"train": 1000, "validation": 100, "test": 100}
OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "data"

SYSTEM = "You are a helpful assistant."
INSTRUCTION = "Normalize this date to YYYY-MM-DD. Reply with the date only."

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIRST_DAY, LAST_DAY = dt.date(1970, 1, 1), dt.date(2035, 12, 31)
# Two-digit years are read as 20YY; keeping them in 2000-2029 makes that reading the only sensible one.
SHORT_YEAR_FIRST, SHORT_YEAR_LAST = dt.date(2000, 1, 1), dt.date(2029, 12, 31)


def ordinal(day: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th', 22 -> '22nd'."""
    suffix = "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _month(d: dt.date) -> str:
    return MONTHS[d.month - 1]


def _mon(d: dt.date) -> str:
    return MONTHS[d.month - 1][:3]


def _weekday(d: dt.date) -> str:
    return WEEKDAYS[d.weekday()]


# Each format renders a date as people write it. `short_year` formats only see dates in 2000-2029.
Format = Callable[[dt.date], str]
FORMATS: dict[str, tuple[Format, bool]] = {
    "ordinal_of": (lambda d: f"{ordinal(d.day)} of {_month(d)} {d.year}", False),
    "the_ordinal_of": (lambda d: f"the {ordinal(d.day)} of {_month(d)}, {d.year}", False),
    "month_day_year": (lambda d: f"{_month(d)} {d.day}, {d.year}", False),
    "month_ordinal_year": (lambda d: f"{_month(d)} {ordinal(d.day)}, {d.year}", False),
    "month_day_short_year": (lambda d: f"{_month(d)} {d.day}, '{d.year % 100:02d}", True),
    "day_month_year": (lambda d: f"{d.day} {_month(d)} {d.year}", False),
    "weekday_day_month_year": (lambda d: f"{_weekday(d)}, {d.day} {_month(d)} {d.year}", False),
    "weekday_month_day_year": (lambda d: f"{_weekday(d)}, {_month(d)} {d.day}, {d.year}", False),
    "day_mon_year_dashes": (lambda d: f"{d.day}-{_mon(d)}-{d.year}", False),
    "day_mon_short_year": (lambda d: f"{d.day} {_mon(d)} '{d.year % 100:02d}", True),
    "mon_day_year": (lambda d: f"{_mon(d)} {d.day} {d.year}", False),
    "mon_dot_day_year": (lambda d: f"{_mon(d)}. {d.day}, {d.year}", False),
    "ymd_dots": (lambda d: f"{d.year}.{d.month}.{d.day}", False),
    "ymd_slashes": (lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}", False),
    "ymd_compact": (lambda d: f"{d.year}{d.month:02d}{d.day:02d}", False),
    "us_numeric": (lambda d: f"{d.month:02d}/{d.day:02d}/{d.year} (US)", False),
    "us_numeric_short": (lambda d: f"{d.month}/{d.day}/{d.year % 100:02d} (US)", True),
    "uk_numeric": (lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (UK)", False),
    "uk_numeric_short": (lambda d: f"{d.day}/{d.month}/{d.year % 100:02d} (UK)", True),
}


def random_date(rng: random.Random, short_year: bool) -> dt.date:
    first, last = (SHORT_YEAR_FIRST, SHORT_YEAR_LAST) if short_year else (FIRST_DAY, LAST_DAY)
    return first + dt.timedelta(days=rng.randrange((last - first).days + 1))


def make_example(text: str, answer: dt.date) -> dict:
    """One chat record in lorakit's `messages` format."""
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"{INSTRUCTION}\n\n{text}"},
        {"role": "assistant", "content": answer.isoformat()},
    ]}


def generate(seed: int = SEED) -> dict[str, list[dict]]:
    """All splits. Formats cycle in a shuffled order so every split covers every format evenly."""
    rng = random.Random(seed)
    names = sorted(FORMATS)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in SPLIT_SIZES.items():
        rows = []
        while len(rows) < size:
            order = names[:]
            rng.shuffle(order)
            for name in order[: size - len(rows)]:
                render, short_year = FORMATS[name]
                while True:  # redraw the (rare) duplicate input so no input appears twice anywhere
                    date = random_date(rng, short_year)
                    text = render(date)
                    if text not in seen:
                        break
                seen.add(text)
                rows.append(make_example(text, date))
        splits[split] = rows
    return splits


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: the package data)")
    parser.add_argument("--check", action="store_true", help="only compare with the files in --out")
    args = parser.parse_args(argv)
    stale = []
    for split, rows in generate().items():
        path = args.out / f"demo_{split}.jsonl"
        text = to_jsonl(rows)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {len(rows)} rows to {path}")
    if stale:
        print(f"out of date: {', '.join(stale)} (run scripts/make_demo_data.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
