"""`lorakit eval`: loss, perplexity and (where rows have answers) exact match of a model or adapter; options
from EvalConfig."""

from __future__ import annotations

import json
from typing import Any

import typer

from lorakit.cli.app import app
from lorakit.cli.options import config_command
from lorakit.train.evaluate import EvalConfig


def _eval(config: EvalConfig) -> None:
    """Evaluate the base model and each adapter on the same data."""
    from lorakit.cli.common import load_model_with_adapters
    from lorakit.train.evaluate import evaluate_models

    loaded, tokenizer, names = load_model_with_adapters(config.model, config.adapter,
                                                        trust_remote_code=config.trust_remote_code,
                                                        device=config.device, dtype=config.dtype)
    report = evaluate_models(loaded, tokenizer, names, config)
    if config.as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_table(report)


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    scored = "exact_match" in report["results"][0]
    table = Table(title=f"lorakit eval: {report['data']} ({report['rows']} rows)")
    for column in ("model", "loss", "perplexity", *(["exact match"] if scored else [])):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in report["results"]:
        cells = [row["model"], f"{row['loss']:.4f}", f"{row['perplexity']:.3f}"]
        if scored:
            cells.append(f"{100 * row['exact_match']:.1f}%")
        table.add_row(*cells)
    Console().print(table)


app.command("eval")(config_command(EvalConfig, _eval))
