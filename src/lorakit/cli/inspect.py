"""`lorakit inspect`: what a saved adapter holds, as a table or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from lorakit.cli.app import ConfigOption, app

if TYPE_CHECKING:
    from lorakit.inspect import AdapterSummary


@app.command("inspect")
def inspect_command(
    adapter: Annotated[Path, typer.Argument(help="Adapter directory (adapter_config.json + adapter_model.safetensors).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")] = False,
    config: Annotated[Optional[Path], ConfigOption] = None,  # noqa: UP045 - Typer reads the annotation at runtime
) -> None:
    """Show an adapter's base model, targets, ranks, scaling, size and the norm of each module's update."""
    from lorakit.inspect import inspect_adapter

    summary = inspect_adapter(adapter)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    _print_summary(summary)


def _print_summary(summary: AdapterSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    info = Table(title=f"adapter {summary.directory}", show_header=False)
    info.add_column(style="bold")
    info.add_column(overflow="fold")
    targets = summary.target_modules if isinstance(summary.target_modules, str) else ", ".join(summary.target_modules or [])
    scaling = "alpha / sqrt(r) (rsLoRA)" if summary.use_rslora else "alpha / r"
    rows = [
        ("base model", summary.base_model or "(not recorded)"),
        ("targets", f"{targets} ({len(summary.modules)} modules)"),
        ("rank r", str(summary.r) + (f"; pattern {summary.rank_pattern}" if summary.rank_pattern else "")),
        ("lora_alpha", f"{summary.lora_alpha:g}" + (f"; pattern {summary.alpha_pattern}" if summary.alpha_pattern else "")),
        ("scaling", scaling),
        ("variant", ", ".join(v for v, on in (("DoRA", summary.use_dora), (f"bias={summary.bias}", summary.bias != "none")) if on) or "LoRA"),
        ("init", str(summary.init_lora_weights)),
        ("modules_to_save", ", ".join(summary.modules_to_save or []) or "none"),
        ("parameters", f"{summary.parameters:,d}"),
        ("file", f"{summary.file}, {summary.file_bytes / 1e6:,.2f} MB, {', '.join(summary.dtypes)}"),
    ]
    for key, value in rows:
        info.add_row(key, value)
    console.print(info)
    modules = Table(title="adapted modules")
    for column in ("module", "kind", "r", "alpha", "scaling", "ΔW shape", "‖ΔW‖_F"):
        modules.add_column(column, justify="left" if column in ("module", "kind") else "right", overflow="fold")
    for m in summary.modules:
        kind = m.kind + (" +DoRA" if m.dora else "") + (" +bias" if m.lora_bias else "")
        modules.add_row(m.name, kind, str(m.r), f"{m.alpha:g}", f"{m.scaling:.4g}", f"{m.shape[0]}×{m.shape[1]}", f"{m.delta_norm:.4g}")
    console.print(modules)
    if summary.saved_tensors:
        saved = Table(title="tensors saved whole")
        for column in ("tensor", "shape", "kind"):
            saved.add_column(column, overflow="fold")
        for t in summary.saved_tensors:
            saved.add_row(t.name, "×".join(map(str, t.shape)), "modules_to_save" if t.modules_to_save else "base tensor")
        console.print(saved)
