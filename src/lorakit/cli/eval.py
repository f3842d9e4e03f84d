"""`lorakit eval`: loss, perplexity and (where rows have answers) exact match of a model or adapter."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Annotated

import typer

from lorakit.cli.app import TrustRemoteCodeOption, app


@app.command("eval")
def eval_command(
    data: Annotated[str | None, typer.Option(help="Data file (default: bundled demo test split).")] = None,
    model: Annotated[str | None, typer.Option(help="Base model (default: embedded SmolLM2).")] = None,
    adapter: Annotated[list[str] | None, typer.Option(help="Adapter NAME=DIR or DIR; repeat to compare several.")] = None,
    max_seq_len: Annotated[int, typer.Option(min=1)] = 512,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per row for exact match.")] = 24,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate at most N rows.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    trust_remote_code: Annotated[bool, TrustRemoteCodeOption] = False,
) -> None:
    """Evaluate the base model and each adapter on the same data."""
    from lorakit.cli.common import load_model_with_adapters
    from lorakit.train.data import bundled_dataset_path, load_records, prompt_messages, reference_answer
    from lorakit.train.evaluate import score_exact_match, validation_loss
    from lorakit.train.tokenize import encode_example

    path = data or str(bundled_dataset_path("test"))
    records = load_records(path)[:limit]
    loaded, tokenizer, names = load_model_with_adapters(model, adapter, trust_remote_code=trust_remote_code)
    examples = [e for e in (encode_example(r, tokenizer, max_seq_len) for r in records) if any(t != -100 for t in e["labels"])]
    pairs = [(prompt_messages(r), reference_answer(r)) for r in records]
    pairs = [(p, a) for p, a in pairs if a is not None]
    device = next(loaded.parameters()).device
    results = []
    for name in ["base", *names]:
        if name != "base":
            loaded.set_adapter(name, inference_mode=True)
        row = {"model": name}
        ctx = loaded.disable_adapter() if name == "base" and names else contextlib.nullcontext()
        with ctx:
            loss = validation_loss(loaded, examples, batch_size, tokenizer.pad_token_id, device)
            row.update(loss=loss, perplexity=math.exp(loss) if loss < 50 else math.inf)
            if pairs:
                em, _ = score_exact_match(loaded, tokenizer, [p for p, _ in pairs], [a for _, a in pairs], max_new_tokens)
                row["exact_match"] = em
        results.append(row)
    if json_output:
        typer.echo(json.dumps({"data": path, "rows": len(records), "results": results}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lorakit eval: {path} ({len(records)} rows)")
    for column in ("model", "loss", "perplexity", *(["exact match"] if pairs else [])):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in results:
        cells = [row["model"], f"{row['loss']:.4f}", f"{row['perplexity']:.3f}"]
        if pairs:
            cells.append(f"{100 * row['exact_match']:.1f}%")
        table.add_row(*cells)
    Console().print(table)
