"""`lorakit compare`: base vs LoRA r=4/8/16 vs OLoRA vs full fine-tuning on the same data and budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorakit.cli.app import app


@app.command()
def compare(
    model: Annotated[str | None, typer.Option(help="Base model (default: embedded SmolLM2).")] = None,
    data: Annotated[str | None, typer.Option(help="Training data (default: bundled demo).")] = None,
    validation_data: Annotated[str | None, typer.Option(help="Validation file.")] = None,
    test_data: Annotated[str | None, typer.Option(help="Test file with answers for exact match.")] = None,
    output: Annotated[Path, typer.Option(help="Directory for every run, compare.json and compare.png.")] = Path("runs/compare"),
    max_steps: Annotated[int, typer.Option(min=1, help="Optimizer steps for every variant.")] = 60,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    learning_rate: Annotated[float, typer.Option(min=0.0, help="LoRA learning rate.")] = 1e-3,
    full_learning_rate: Annotated[float, typer.Option(min=0.0, help="Full fine-tuning learning rate.")] = 5e-5,
    only: Annotated[list[str] | None, typer.Option(help="Run only these variants (lora-r4, lora-r8, lora-r16, olora-r8, full).")] = None,
    eval_limit: Annotated[int | None, typer.Option(min=1, help="Score at most N test rows.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing comparison in --output.")] = False,
) -> None:
    """Train every variant with the same data and steps; print a table and write compare.json + compare.png."""
    from lorakit.cli.options import split_commas
    from lorakit.errors import LorakitError
    from lorakit.train.compare import default_variants, print_comparison, run_comparison

    common = {"max_steps": max_steps, "batch_size": batch_size, "model": model, "data": data,
              "validation_data": validation_data, "test_data": test_data, "eval_limit": eval_limit}
    variants = default_variants(learning_rate, full_learning_rate)
    if only:
        wanted = split_commas(only)
        unknown = sorted(set(wanted) - {v.name for v in variants})
        if unknown:
            raise LorakitError(f"--only: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(v.name for v in variants)}")
        variants = [v for v in variants if v.name in wanted]
    rows = run_comparison(output, common, variants, overwrite=overwrite)
    print_comparison(rows)
    typer.echo(f"wrote {output / 'compare.json'} and {output / 'compare.png'}")
