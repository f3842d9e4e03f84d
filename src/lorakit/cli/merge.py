"""`lorakit merge`: adapters merged into a base checkpoint on disk, streamed and verified."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from lorakit.cli.app import ConfigOption, app
from lorakit.cli.options import split_commas

if TYPE_CHECKING:
    from lorakit.merge.streaming import MergeReport


class Dtype(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


@app.command("merge")
def merge_command(
    adapter: Annotated[list[Path], typer.Option("--adapter", help="Adapter directory; repeat to merge several.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the merged model.")],
    model: Annotated[str, typer.Option("--model", help="Base model: local directory, .gguf file or 'default' (embedded SmolLM2-135M-Instruct).")] = "default",
    weights: Annotated[Optional[list[str]], typer.Option("--weights", help="Weight per adapter, comma-separated (e.g. 0.7,0.3) (default: 1 each).")] = None,  # noqa: UP045 - Typer reads the annotation at runtime
    dtype: Annotated[Dtype, typer.Option("--dtype", help="Output dtype; auto keeps the base's.")] = Dtype.auto,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 2GB, 500MB.")] = "2GB",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Re-read the output and check every tensor.")] = True,
    verify_outputs: Annotated[bool, typer.Option("--verify-outputs/--no-verify-outputs", help="Also compare logits with base + adapter in memory (loads both models).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    config: Annotated[Optional[Path], ConfigOption] = None,  # noqa: UP045
) -> None:
    """Merge LoRA adapters into the base weights and write a standalone transformers model.

    Streams the base checkpoint tensor by tensor (memory stays far below the model size), adds Σ wᵢ·ΔWᵢ in
    float32, rounds once, and writes sharded safetensors with config, generation config and tokenizer.
    """
    from lorakit.merge.streaming import merge_checkpoint

    weight_values = _parse_weights(split_commas(weights))
    report = merge_checkpoint(
        model, [str(p) for p in adapter], output, weights=weight_values, dtype=dtype.value,
        max_shard_size=max_shard_size, verify=verify, verify_outputs=verify_outputs, overwrite=overwrite, progress=True,
    )
    _print_report(report)


def _parse_weights(values: list[str] | None) -> list[float] | None:
    if values is None:
        return None
    try:
        return [float(v) for v in values]
    except ValueError:
        raise typer.BadParameter(f"expected numbers such as 0.7,0.3, got {','.join(values)!r}", param_hint="--weights") from None


def _print_report(report: MergeReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"merged into {report.output}", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("base", report.base)
    for path, weight in zip(report.adapters, report.weights):
        table.add_row("adapter", f"{path}  (weight {weight:g})")
    table.add_row("dtype", report.dtype)
    table.add_row("written", f"{report.shards} shard(s), {report.total_bytes / 1e6:,.1f} MB")
    table.add_row("tensors", f"{report.tensors_merged} merged, {report.tensors_replaced} replaced, "
                             f"{report.tensors_copied} copied, {report.tensors_added} added")
    if report.untied_embeddings:
        table.add_row("tied weights", "untied (the adapter changes only one of them); tie_word_embeddings=false")
    check = report.verification
    if check is None:
        table.add_row("verification", "skipped (--no-verify)")
    else:
        table.add_row("verification", f"[green]passed[/green]: {check.merged_checked} merged tensors within "
                                       f"{check.max_ulp_error:.2g} ulp (max abs error {check.max_abs_error:.3g}), "
                                       f"{check.identical_checked} bit-identical")
    outputs = report.outputs
    if outputs is not None:
        table.add_row("outputs", f"max |Δlogit| {outputs.max_logit_diff:.3g}, argmax agreement "
                                 f"{100 * outputs.argmax_agreement:.1f}% over {outputs.tokens} tokens")
        table.add_row("perplexity", f"{outputs.perplexity_reference:.4g} (adapter) → {outputs.perplexity_merged:.4g} "
                                    f"(merged), Δ {outputs.perplexity_delta:+.3g}")
    table.add_row("peak memory", f"{report.peak_rss_bytes / 2**20:,.0f} MiB RSS")
    table.add_row("time", f"{report.seconds:.1f} s")
    Console().print(table)
