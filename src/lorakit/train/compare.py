"""`lorakit compare`: the same data and step budget for the base model, LoRA at several ranks, OLoRA and
full fine-tuning, side by side — the comparison the LoRA guide tells users to make.

Each variant runs `lorakit train` in its own process, so its peak memory is its own; the table is built
from the runs' report.json files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.io.atomic import atomic_file, atomic_write_text


@dataclass(frozen=True)
class Variant:
    name: str
    args: tuple[str, ...]


def default_variants(learning_rate: float, full_learning_rate: float) -> list[Variant]:
    lora = ("--method", "lora", "--learning-rate", str(learning_rate))
    return [
        Variant("lora-r4", (*lora, "--r", "4", "--lora-alpha", "8")),
        Variant("lora-r8", (*lora, "--r", "8", "--lora-alpha", "16")),
        Variant("lora-r16", (*lora, "--r", "16", "--lora-alpha", "32")),
        Variant("olora-r8", (*lora, "--r", "8", "--lora-alpha", "16", "--init", "olora")),
        Variant("full", ("--method", "full", "--learning-rate", str(full_learning_rate))),
    ]


def run_comparison(output: Path, common_args: list[str], variants: list[Variant], *, overwrite: bool = False) -> list[dict[str, Any]]:
    """Run every variant (a subprocess each) and return one row per variant plus the base model's row."""
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise LorakitError(f"--output {output}: holds another comparison; pass --overwrite to replace it")
    output.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for variant in variants:
        run_dir = output / variant.name
        command = [sys.executable, "-m", "lorakit", "train", *common_args, *variant.args, "--output", str(run_dir), "--overwrite"]
        print(f"== {variant.name}: {' '.join(command[3:])}", flush=True)
        done = subprocess.run(command)
        if done.returncode != 0:
            raise LorakitError(f"compare: variant {variant.name} failed (exit {done.returncode}); see its output above")
        report = json.loads((run_dir / "report.json").read_text())
        if not rows:
            rows.append({"variant": "base", "trainable_params": 0, "peak_memory_mb": None, "train_seconds": 0.0,
                         "val_loss": report.get("base_val_loss"), "exact_match": report.get("exact_match_base")})
        rows.append({"variant": variant.name, "trainable_params": report["trainable_params"],
                     "peak_memory_mb": report["peak_memory_mb"], "train_seconds": report["train_seconds"],
                     "val_loss": report.get("best_val_loss") or report.get("final_val_loss"),
                     "exact_match": report.get("exact_match_adapter")})
    atomic_write_text(output / "compare.json", json.dumps(rows, indent=2) + "\n")
    plot_comparison(rows, output / "compare.png")
    return rows


def plot_comparison(rows: list[dict[str, Any]], path: Path) -> None:
    """Bars of validation loss, exact match, peak memory and time per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("val_loss", "validation loss"), ("exact_match", "exact match"), ("peak_memory_mb", "peak memory (MB)"),
              ("train_seconds", "train time (s)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), dpi=110)
    names = [r["variant"] for r in rows]
    for ax, (key, title) in zip(axes, panels):
        values = [r.get(key) if r.get(key) is not None else 0 for r in rows]
        ax.bar(names, values, color=["tab:gray"] + ["tab:blue"] * (len(rows) - 2) + ["tab:red"])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def print_comparison(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lorakit compare (same data, same steps)")
    for column in ("variant", "trainable params", "peak memory MB", "train s", "val loss", "exact match"):
        table.add_column(column, justify="left" if column == "variant" else "right")

    def fmt(value: Any, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    for row in rows:
        table.add_row(row["variant"], fmt(row["trainable_params"], ",d"), fmt(row["peak_memory_mb"], ",.0f"),
                      fmt(row["train_seconds"], ".1f"), fmt(row["val_loss"], ".4f"),
                      "–" if row["exact_match"] is None else f"{100 * row['exact_match']:.0f}%")
    Console().print(table)
