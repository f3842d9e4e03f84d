"""`lorakit export`: a merged model or an adapter alone as a GGUF file for llama.cpp, Ollama, LM Studio."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorakit.cli.app import app
from lorakit.cli.options import config_command
from lorakit.export.config import ExportConfig

if TYPE_CHECKING:
    from lorakit.export import ExportReport


def _export(config: ExportConfig) -> None:
    """Export to GGUF: the merged model (base + adapters, streamed tensor by tensor), or an adapter alone.

    The model file carries the hyperparameters and tokenizer (vocabulary, merges, special tokens, chat
    template) llama.cpp needs; Llama, Mistral, Qwen2 and SmolLM2 bases.
    """
    from lorakit.export.config import export

    _print_report(export(config, progress=True))


def _print_report(report: ExportReport) -> None:
    from rich.console import Console
    from rich.table import Table

    what = "GGUF LoRA adapter" if report.kind == "adapter" else "GGUF model"
    table = Table(title=f"{what} written to {report.output}", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("base", report.base)
    for path, weight in zip(report.adapters, report.weights):
        table.add_row("adapter", path if report.kind == "adapter" else f"{path}  (weight {weight:g})")
    table.add_row("architecture", report.architecture)
    table.add_row("tensors", f"{report.tensors}: " + ", ".join(f"{n} {t}" for t, n in report.types.items()))
    size = report.total_bytes
    table.add_row("written", f"{size / 1e6:,.1f} MB" if size >= 1e6 else f"{size / 1e3:,.1f} kB")
    for note in report.notes:
        table.add_row("note", note)
    if report.memory is not None:
        table.add_row("peak memory", report.memory.summary())
    table.add_row("time", f"{report.seconds:.1f} s")
    Console().print(table)


app.command("export")(config_command(ExportConfig, _export))
