"""Per-rank memory of 2-process training on the embedded SmolLM2-135M-Instruct: data parallel vs `--fsdp`.

Each strategy runs `lorakit train` (LoRA r=8 on all linear layers, bundled data, batch 4 per process,
3 steps) under `torchrun --nproc_per_node 2` on the CPU. Every process reports the bytes it holds for
parameters, gradients and AdamW state (measured on its live tensors; `rank_*_bytes` in report.json) and its
peak RSS; the table compares the two strategies side by side.

    .venv/bin/python benchmarks/fsdp_memory.py
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = 3


def worker(strategy: str, out: Path) -> None:
    """One process of a launch: train, then write this rank's figures."""
    from lorakit.train.config import TrainConfig
    from lorakit.train.sft import train

    config = TrainConfig.from_options({"output": str(out / "run"), "max_steps": STEPS, "batch_size": 4,
                                       "eval_every": 100, "test_data": None, "fsdp": strategy == "fsdp",
                                       "overwrite": True, "validation_data": None})
    report = train(config).report
    rank = int(os.environ["RANK"])
    figures = {k: report[k] for k in ("rank_parameter_bytes", "rank_gradient_bytes", "rank_optimizer_bytes")}
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / f"rank{rank}.json").write_text(json.dumps(figures))


def launch(strategy: str, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    __file__, "--worker", strategy, str(out)], check=True, env=env)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ("ddp", "fsdp"):
            rows[strategy] = launch(strategy, Path(tmp) / strategy)
    mb = 2**20
    print(
        "| strategy | rank | parameters MB | gradients MB | AdamW state MB | params + AdamW MB | peak RSS MB "
        "|"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for strategy, ranks in rows.items():
        for rank, r in enumerate(ranks):
            held = r["rank_parameter_bytes"] + r["rank_optimizer_bytes"]
            print(
                f"| {strategy} | {rank} | {r['rank_parameter_bytes'] / mb:.1f} | "
                f"{r['rank_gradient_bytes'] / mb:.1f} | "
                f"{r['rank_optimizer_bytes'] / mb:.1f} | {held / mb:.1f} | {r['peak_rss_mb']:.0f} |"
            )
    ratio = max((r["rank_parameter_bytes"] + r["rank_optimizer_bytes"]) for r in rows["fsdp"]) / \
        max((r["rank_parameter_bytes"] + r["rank_optimizer_bytes"]) for r in rows["ddp"])
    rss = max(r["peak_rss_mb"] for r in rows["fsdp"]) / max(r["peak_rss_mb"] for r in rows["ddp"])
    print(f"\nFSDP2 / DDP per rank: parameters + AdamW state {ratio:.2f}x, peak RSS {rss:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
