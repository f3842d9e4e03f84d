"""Run the side-by-side benchmarks one after another (`make bench`); each prints its own table and saves
its numbers to benchmarks/results/<name>.json.

    .venv/bin/python benchmarks/run_all.py [--quick]

`--quick` runs fewer rounds and a 40-step SFT (a smoke run, not numbers to quote). Run on an otherwise
idle machine: the scripts alternate lorakit and PEFT so that drift hits both, but a busy machine still
widens the spread of the ratios.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SCRIPTS = {
    "bench_train_step.py": (["--rounds", "7"], ["--rounds", "3"]),
    "bench_inference.py": (["--rounds", "5"], ["--rounds", "2"]),
    "bench_merge.py": (["--rounds", "3"], ["--rounds", "1"]),
    "bench_sft.py": ([], ["--max-steps", "40"]),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for script, (full, quick) in SCRIPTS.items():
        print(f"== {script}", flush=True)
        done = subprocess.run(
            [sys.executable, str(HERE / script), *(quick if args.quick else full)], check=False
        )
        if done.returncode != 0:
            print(f"{script} failed with exit code {done.returncode}", file=sys.stderr)
            return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
