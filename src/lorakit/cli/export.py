"""`lorakit export`: a merged model or an adapter alone as a GGUF file for llama.cpp, Ollama, LM Studio."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from lorakit.cli.app import ConfigOption, app
from lorakit.cli.options import split_commas

if TYPE_CHECKING:
    from lorakit.export import ExportReport


class Format(str, enum.Enum):
    gguf = "gguf"


class GgufType(str, enum.Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"
    q5_1 = "q5_1"
    q5_0 = "q5_0"
    q4_1 = "q4_1"
    q4_0 = "q4_0"


@app.command("export")
def export_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="The .gguf file to write.")],
    format: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.gguf,
    model: Annotated[str, typer.Option(
        "--model", help="Base model (or a merged model): local directory, .gguf file or 'default' "
                        "(embedded SmolLM2-135M-Instruct).")] = "default",
    adapter: Annotated[Optional[list[Path]], typer.Option(  # noqa: UP045 - Typer reads the annotation at runtime
        "--adapter", help="Adapter directory to merge in; repeat for several. None: export --model as it "
                          "is.")] = None,
    weights: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--weights", help="Weight per adapter, comma-separated (e.g. 0.7,0.3) (default: 1 each).")] = None,
    type: Annotated[GgufType, typer.Option(
        "--type", help="Tensor type of the matrices (vectors stay f32); q* are llama.cpp's block "
                       "quantizations.")] = GgufType.f16,
    adapter_only: Annotated[bool, typer.Option(
        "--adapter-only", help="Write the one --adapter as a GGUF LoRA adapter (llama.cpp --lora) instead of "
                               "a merged model.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    config: Annotated[Optional[Path], ConfigOption] = None,  # noqa: UP045
) -> None:
    """Export to GGUF: the merged model (base + adapters, streamed tensor by tensor), or an adapter alone.

    The model file carries the hyperparameters and tokenizer (vocabulary, merges, special tokens, chat
    template) llama.cpp needs; Llama, Mistral, Qwen2 and SmolLM2 bases.
    """
    # merge's --weights parser, imported here so that `merge` keeps its place in the command list
    from lorakit.cli.merge import _parse_weights
    from lorakit.errors import LorakitError
    from lorakit.export import export_adapter_gguf, export_gguf

    adapters = [str(p) for p in adapter or []]
    if adapter_only:
        if len(adapters) != 1 or weights:
            raise LorakitError("--adapter-only: give exactly one --adapter and no --weights")
        report = export_adapter_gguf(model, adapters[0], output, type=type.value, overwrite=overwrite,
                                     progress=True)
    else:
        report = export_gguf(model, output, adapters, weights=_parse_weights(split_commas(weights)),
                             type=type.value, overwrite=overwrite, progress=True)
    _print_report(report)


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
    table.add_row("time", f"{report.seconds:.1f} s")
    Console().print(table)
