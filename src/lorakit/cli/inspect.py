"""`lorakit inspect`: what a saved adapter holds, as a table or JSON; options from InspectConfig."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer

from lorakit.cli.app import app
from lorakit.cli.options import config_command
from lorakit.options import Options, argument, option

if TYPE_CHECKING:
    from lorakit.inspect import AdapterSummary


@dataclass
class InspectConfig(Options):
    """Every option of `lorakit inspect`."""

    adapter: str = argument(help="Adapter directory (adapter_config.json + adapter_model.safetensors).")
    as_json: bool = option(False, help="Print machine-readable JSON instead of tables.", flags=("--json",))


def _inspect(config: InspectConfig) -> None:
    """Show an adapter's base model, targets, ranks, scaling, size and the norm of each module's update."""
    from lorakit.inspect import inspect_adapter

    summary = inspect_adapter(config.adapter)
    if config.as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    _print_summary(summary)


def _summary_rows(summary: AdapterSummary) -> list[tuple[str, str]]:
    """(key, value) rows of the adapter's table."""
    targets = summary.target_modules
    if not isinstance(targets, str):
        targets = ", ".join(targets or [])
    variants = (("DoRA", summary.use_dora), (f"bias={summary.bias}", summary.bias != "none"))
    rank_pattern = f"; pattern {summary.rank_pattern}" if summary.rank_pattern else ""
    alpha_pattern = f"; pattern {summary.alpha_pattern}" if summary.alpha_pattern else ""
    return [
        ("base model", summary.base_model or "(not recorded)"),
        ("targets", f"{targets} ({len(summary.modules)} modules)"),
        ("rank r", f"{summary.r}{rank_pattern}"),
        ("lora_alpha", f"{summary.lora_alpha:g}{alpha_pattern}"),
        ("scaling", "alpha / sqrt(r) (rsLoRA)" if summary.use_rslora else "alpha / r"),
        ("variant", ", ".join(v for v, on in variants if on) or "LoRA"),
        ("init", str(summary.init_lora_weights)),
        ("modules_to_save", ", ".join(summary.modules_to_save or []) or "none"),
        ("parameters", f"{summary.parameters:,d}"),
        ("file", f"{summary.file}, {summary.file_bytes / 1e6:,.2f} MB, {', '.join(summary.dtypes)}"),
    ]


def _print_summary(summary: AdapterSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    info = Table(title=f"adapter {summary.directory}", show_header=False)
    info.add_column(style="bold")
    info.add_column(overflow="fold")
    for key, value in _summary_rows(summary):
        info.add_row(key, value)
    console.print(info)
    modules = Table(title="adapted modules")
    for column in ("module", "kind", "r", "alpha", "scaling", "ΔW shape", "‖ΔW‖_F"):
        justify = "left" if column in ("module", "kind") else "right"
        modules.add_column(column, justify=justify, overflow="fold")
    for m in summary.modules:
        kind = m.kind + (" +DoRA" if m.dora else "") + (" +bias" if m.lora_bias else "")
        modules.add_row(m.name, kind, str(m.r), f"{m.alpha:g}", f"{m.scaling:.4g}",
                        f"{m.shape[0]}×{m.shape[1]}", f"{m.delta_norm:.4g}")
    console.print(modules)
    if summary.saved_tensors:
        saved = Table(title="tensors saved whole")
        for column in ("tensor", "shape", "kind"):
            saved.add_column(column, overflow="fold")
        for t in summary.saved_tensors:
            kind = "modules_to_save" if t.modules_to_save else "base tensor"
            saved.add_row(t.name, "×".join(map(str, t.shape)), kind)
        console.print(saved)


app.command("inspect")(config_command(InspectConfig, _inspect))
