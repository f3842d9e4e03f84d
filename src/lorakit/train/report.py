"""What a run leaves behind for people: metrics.jsonl, loss_curve.png, report.json and a terminal table."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from lorakit.io.atomic import atomic_file, atomic_write_text


class MetricsLog:
    """Appends one JSON object per line; a resumed run keeps appending to the same file."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, **record: Any) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [
            json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]


def truncate_metrics(log: MetricsLog, step: int) -> None:
    """Drop records past `step` (written after the checkpoint a resumed run restarts from)."""
    kept = [r for r in log.read() if r.get("step", 0) <= step]
    atomic_write_text(log.path, "".join(json.dumps(r) + "\n" for r in kept))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / 1024 if sys.platform != "darwin" else kilobytes / 2**20


def plot_loss_curve(records: list[dict[str, Any]], path: Path, title: str = "Training",
                    ylabel: str = "loss (nats / token)", curves: tuple[str, ...] = ()) -> None:
    """Train loss per step (light) with a moving average and validation loss points; then one panel per
    per-step figure named in `curves` (e.g. GRPO's reward), from the train records that hold it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    panels = [("loss", ylabel)] + [(name, name.replace("_", " ")) for name in curves]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), dpi=110, squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        points = [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
        if points:
            _smoothed(ax, points, f"train {label}" if key == "loss" else label)
        if key == "loss":
            val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
            if val:
                ax.plot(*zip(*val), "o-", color="tab:orange", linewidth=2, label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_title(title)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _smoothed(ax, points: list[tuple[int, float]], label: str) -> None:
    """The raw series (light) and its moving average over a twentieth of it."""
    steps, values = zip(*points)
    ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1, label=label)
    window = max(1, len(values) // 20)
    smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
              for i in range(len(values))]
    ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"{label} (mean of {window})")


def write_report(path: Path, report: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def print_report(report: dict[str, Any], title: str = "lorakit train") -> None:
    """The final summary as a table in the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report.items():
        if isinstance(value, (dict, list)):
            continue
        table.add_row(key.replace("_", " "), _fmt(value))
    Console(stderr=False).print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,d}"
    return str(value)


class RunReport:
    """The report of one run (report.json and the terminal table), filled in as the run goes."""

    def __init__(self, describe: str, loss_label: str, curves: tuple[str, ...]) -> None:
        self.describe, self.loss_label, self.curves = describe, loss_label, curves
        self.values: dict[str, Any] = {}
        self.last_eval: dict[str, float] = {}

    def start(self, method: str, stats: dict[str, Any], parameters: tuple[int, int]) -> None:
        trainable, total = parameters
        self.values.update(method=method, trainable_params=trainable, total_params=total,
                           trainable_percent=round(100 * trainable / total, 4), **stats)

    def loop_done(self, progress: Any, stopped_early: bool, final_train_loss: float) -> None:
        """What the loop ended with (`progress`: train.checkpoint.Progress)."""
        self.values.update(
            steps=progress.step,
            stopped_early=stopped_early,
            final_train_loss=final_train_loss,
            final_val_loss=self.values.get("final_val_loss"),
            best_val_loss=progress.best_val_loss,
            **{f"final_val_{k}": v for k, v in self.last_eval.items() if k != "loss"},
            tokens_per_second=progress.tokens_seen / max(progress.elapsed, 1e-9),
            train_seconds=progress.elapsed,
        )

    def finish(self, device: torch.device, processes: int, main: bool, summary: dict[str, Any],
               wall_seconds: float, out: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Add the closing figures; on the main process also write report.json and the plot and print the
        table. Returns the report."""
        self.values.update(peak_memory_mb=peak_memory_mb(device), processes=processes)
        if main:
            self.values.update(summary)
            self.values.update(wall_seconds=wall_seconds, output_dir=str(out))
            write_report(out / "report.json", self.values)
            plot_loss_curve(records, out / "loss_curve.png", title=f"lorakit {self.describe}",
                            ylabel=self.loss_label, curves=self.curves)
            print_report(self.values, title=f"lorakit {self.describe} → {out}")
        return self.values
