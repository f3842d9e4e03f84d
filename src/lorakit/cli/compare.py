"""`lorakit compare`: base vs LoRA r=4/8/16 vs OLoRA vs full fine-tuning on the same data and budget;
options from CompareConfig."""

from __future__ import annotations

from pathlib import Path

import typer

from lorakit.cli.app import app
from lorakit.cli.options import config_command
from lorakit.train.compare import CompareConfig


def _compare(config: CompareConfig) -> None:
    """Train every variant with the same data and steps; print a table, write compare.json + compare.png."""
    from lorakit.train.compare import print_comparison, run_comparison

    print_comparison(run_comparison(config))
    output = Path(config.output)
    typer.echo(f"wrote {output / 'compare.json'} and {output / 'compare.png'}")


app.command("compare")(config_command(CompareConfig, _compare))
