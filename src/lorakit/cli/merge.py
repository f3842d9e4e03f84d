"""`lorakit merge`: adapters merged into a base checkpoint on disk, streamed and verified; options from
MergeConfig."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorakit.cli.app import app
from lorakit.cli.options import config_command
from lorakit.merge.config import MergeConfig

if TYPE_CHECKING:
    from lorakit.merge.streaming import MergeReport


def _merge(config: MergeConfig) -> None:
    """Merge LoRA adapters into the base weights and write a standalone transformers model.

    Streams the base checkpoint tensor by tensor (memory stays far below the model size), adds Σ wᵢ·ΔWᵢ in
    float32, rounds once, and writes sharded safetensors with config, generation config and tokenizer.
    """
    from lorakit.merge.config import merge

    _print_report(merge(config, progress=True))


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
        table.add_row("tied weights", "untied (the adapter changes only one of them); "
                                      "tie_word_embeddings=false")
    check = report.verification
    if check is None:
        table.add_row("verification", "skipped (--no-verify)")
    else:
        table.add_row("verification", f"[green]passed[/green]: {check.merged_checked} merged tensors within "
                                       f"{check.max_ulp_error:.2g} ulp (max abs error "
                                       f"{check.max_abs_error:.3g}), {check.identical_checked} bit-identical")
    outputs = report.outputs
    if outputs is not None:
        table.add_row("outputs", f"max |Δlogit| {outputs.max_logit_diff:.3g}, argmax agreement "
                                 f"{100 * outputs.argmax_agreement:.1f}% over {outputs.tokens} tokens")
        table.add_row("perplexity", f"{outputs.perplexity_reference:.4g} (adapter) → "
                                    f"{outputs.perplexity_merged:.4g} (merged), "
                                    f"Δ {outputs.perplexity_delta:+.3g}")
    table.add_row("peak memory", report.memory.summary())
    table.add_row("time", f"{report.seconds:.1f} s")
    Console().print(table)


app.command("merge")(config_command(MergeConfig, _merge))
