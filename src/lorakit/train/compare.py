"""`lorakit compare`: the same data and step budget for the base model, LoRA at several ranks, OLoRA and
full fine-tuning, side by side — the comparison the LoRA guide tells users to make.

The comparison's options are a `CompareConfig`; each variant is a `TrainConfig` trained in a fresh
process of its own (multiprocessing's "spawn"), so its peak memory is its own; the table is built from
the runs' report.json files.
"""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.io.atomic import atomic_file, atomic_write_text
from lorakit.options import OptionError, Options, finite, option, positive_ints
from lorakit.train.config import TrainConfig


@dataclass(frozen=True)
class Variant:
    name: str
    options: dict[str, Any]
    """TrainConfig options of this variant, on top of the options all variants share."""


def default_variants(learning_rate: float, full_learning_rate: float) -> list[Variant]:
    lora = {"method": "lora", "learning_rate": learning_rate}
    return [
        Variant("lora-r4", {**lora, "r": 4, "lora_alpha": 8}),
        Variant("lora-r8", {**lora, "r": 8, "lora_alpha": 16}),
        Variant("lora-r16", {**lora, "r": 16, "lora_alpha": 32}),
        Variant("olora-r8", {**lora, "r": 8, "lora_alpha": 16, "init_lora_weights": "olora"}),
        Variant("full", {"method": "full", "learning_rate": full_learning_rate}),
    ]


@dataclass
class CompareConfig(Options):
    """Every option of `lorakit compare`: the data and budget every variant shares, and which variants."""

    model: str | None = option(None, help="Base model (default: embedded SmolLM2).")
    data: str | None = option(None, help="Training data (default: bundled demo).")
    validation_data: str | None = option(None, help="Validation file.")
    test_data: str | None = option(None, help="Test file with answers for exact match.")
    output: str = option("runs/compare", help="Directory for every run, compare.json and compare.png.")
    max_steps: int = option(60, help="Optimizer steps for every variant.")
    batch_size: int = option(8, help="Rows per micro-batch for every variant.")
    learning_rate: float = option(1e-3, help="LoRA learning rate.")
    full_learning_rate: float = option(5e-5, help="Full fine-tuning learning rate.")
    only: list[str] | None = option(None, help="Run only these variants (lora-r4, lora-r8, lora-r16, "
                                               "olora-r8, full).")
    eval_limit: int | None = option(None, help="Score at most N test rows.")
    overwrite: bool = option(False, help="Replace an existing comparison in --output.")

    def validate(self) -> None:
        positive_ints(self, ("max_steps", "batch_size"), ("eval_limit",))
        for name in ("learning_rate", "full_learning_rate"):
            if not finite(getattr(self, name)) or getattr(self, name) <= 0:
                raise OptionError(name, "a positive number", getattr(self, name))
        names = [v.name for v in default_variants(self.learning_rate, self.full_learning_rate)]
        unknown = sorted(set(self.only or []) - set(names))
        if unknown:
            raise ValueError(f"--only: unknown variant(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(names)}")

    def variants(self) -> list[Variant]:
        """The variants to run, in the standard order."""
        every = default_variants(self.learning_rate, self.full_learning_rate)
        return [v for v in every if self.only is None or v.name in self.only]

    def shared_options(self) -> dict[str, Any]:
        """The TrainConfig options every variant shares."""
        return {"model": self.model, "data": self.data, "validation_data": self.validation_data,
                "test_data": self.test_data, "max_steps": self.max_steps, "batch_size": self.batch_size,
                "eval_limit": self.eval_limit}


def _train_in_this_process(config: TrainConfig) -> None:
    from lorakit.train.sft import train

    train(config)


def run_comparison(config: CompareConfig) -> list[dict[str, Any]]:
    """Train every variant (shared options + its own, each in a new process) and return one row per
    variant plus the base model's row. Every variant's options are checked before the first one runs."""
    output = Path(config.output)
    if output.exists() and any(output.iterdir()) and not config.overwrite:
        raise LorakitError(f"--output {output}: holds another comparison; pass --overwrite to replace it")
    configs = {v.name: TrainConfig.from_options({**config.shared_options(), **v.options,
                                                 "output": str(output / v.name), "overwrite": True})
               for v in config.variants()}
    output.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    spawn = multiprocessing.get_context("spawn")
    for name, config in configs.items():
        print(f"== {name}", flush=True)
        process = spawn.Process(target=_train_in_this_process, args=(config,))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise LorakitError(f"compare: variant {name} failed (exit {process.exitcode}); "
                               "see its output above")
        report = json.loads((config.output_dir / "report.json").read_text())
        if not rows:
            rows.append({"variant": "base", "trainable_params": 0, "peak_memory_mb": None,
                         "train_seconds": 0.0, "val_loss": report.get("base_val_loss"),
                         "exact_match": report.get("exact_match_base")})
        rows.append({"variant": name, "trainable_params": report["trainable_params"],
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

    panels = [("val_loss", "validation loss"), ("exact_match", "exact match"),
              ("peak_memory_mb", "peak memory (MB)"), ("train_seconds", "train time (s)")]
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
