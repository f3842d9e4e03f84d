"""`lorakit version`."""

from __future__ import annotations

import typer

from lorakit.cli.app import app


@app.command()
def version() -> None:
    """Print lorakit's version and the versions of the libraries it runs on."""
    import torch
    import transformers

    import lorakit

    typer.echo(f"lorakit {lorakit.__version__} "
               f"(torch {torch.__version__}, transformers {transformers.__version__})")
