"""Collect a GPU run's results (benchmarks/gpu/run.sh) into OUT/summary.json: the steps' exit statuses, the
cuda tests' counts, the headline figures and issue 19's targets, each met or not (null: not measured, or a
--tiny dry run, whose figures are no measurement).

    python benchmarks/gpu/summary.py OUT [--tiny]
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

from common import write_json

EIGHT_B = "llama-3.1-8b"


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def test_counts(path: Path) -> dict[str, int] | None:
    if not path.is_file():
        return None
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def _at_least(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


def targets(train: dict[str, Any], decode: dict[str, Any], tests: dict[str, int] | None) -> dict[str, Any]:
    """Issue 19's targets: {name: {"value", "target", "met"}}."""
    eight = train.get("shapes", {}).get(EIGHT_B, {})
    ratio = eight.get("lorakit_vs_peft", {})
    mfu = eight.get("results", {}).get("lorakit", {}).get("mfu")
    memory = ratio.get("peak_memory")
    rows = decode.get("mixed", {}).get("rows")
    unmerged = decode.get("single", {}).get(f"rows_{rows}", {}).get("lorakit_vs_base")
    passed = None if tests is None else tests["tests"] > 0 and tests["failures"] + tests["errors"] == 0
    return {
        "8b_tokens_per_s_vs_peft": {
            "value": ratio.get("tokens_per_s"),
            "target": ">= 1.5",
            "met": _at_least(ratio.get("tokens_per_s"), 1.5),
        },
        "8b_peak_memory_vs_peft": {
            "value": memory,
            "target": "<= 0.8",
            "met": None if memory is None else memory <= 0.8,
        },
        "8b_mfu": {"value": mfu, "target": ">= 0.45", "met": _at_least(mfu, 0.45)},
        "mixed_decode_vs_peft": {
            "value": decode.get("mixed", {}).get("lorakit_vs_peft"),
            "target": ">= 3",
            "met": _at_least(decode.get("mixed", {}).get("lorakit_vs_peft"), 3.0),
        },
        "unmerged_decode_vs_base": {"value": unmerged, "target": ">= 0.9", "met": _at_least(unmerged, 0.9)},
        "cuda_tests_pass": {"value": tests, "target": "all pass", "met": passed},
    }


def main() -> None:
    out = Path(sys.argv[1])
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    train, decode = _read(out / "train.json"), _read(out / "decode.json")
    tests = test_counts(out / "pytest_cuda.xml")
    tiny = "--tiny" in sys.argv
    checked = targets(train, decode, tests)
    if tiny:  # a tiny model on a CPU measures nothing the targets are about
        checked = {name: {**entry, "met": None} for name, entry in checked.items()}
    summary = {
        "tiny_dry_run": tiny,
        "environment": train.get("environment"),
        "steps": steps,
        "matmul": train.get("matmul"),
        "targets": checked,
    }
    write_json(out / "summary.json", summary)
    print(json.dumps(summary["targets"], indent=1))


if __name__ == "__main__":
    main()
