"""`lorakit demo` (the README's first command): fine-tune the embedded model on the bundled task, merge
the adapter with verification, and compare exact match of base vs LoRA vs merged on the test split."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from lorakit.cli.app import app


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="Where the run, the adapter and the merged model go.")] = Path("runs/demo"),
    max_steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps (default: one epoch).")] = None,
) -> None:
    """Train LoRA on the bundled date-normalisation task, merge it, and score base / LoRA / merged."""
    from rich.console import Console
    from rich.table import Table

    from lorakit.merge.streaming import merge_checkpoint
    from lorakit.models.sources import load_causal_lm, load_tokenizer
    from lorakit.train.config import TrainConfig
    from lorakit.train.data import bundled_dataset_path, load_records, prompt_messages, reference_answer
    from lorakit.train.evaluate import score_exact_match
    from lorakit.train.sft import train

    console = Console()
    started = time.perf_counter()
    console.rule("1/3  LoRA fine-tune of SmolLM2-135M-Instruct on the bundled dates task")
    config = TrainConfig(output=str(output / "train"), overwrite=True, max_steps=max_steps)
    result = train(config)
    console.rule("2/3  Streaming merge with verification")
    merged_dir = output / "merged"
    merge = merge_checkpoint(None, result.adapter_dir, merged_dir, overwrite=True, progress=True)
    check = merge.verification
    console.print(f"merged {merge.tensors_merged} tensors, copied {merge.tensors_copied}; verification "
                  f"{'passed' if check and check.passed else 'FAILED'}; peak RSS {merge.peak_rss_bytes / 2**20:,.0f} MB")
    console.rule("3/3  Exact match on the test split")
    records = load_records(bundled_dataset_path("test"))
    conversations, references = [prompt_messages(r) for r in records], [reference_answer(r) for r in records]
    merged_model = load_causal_lm(merged_dir).eval()
    merged_em, _ = score_exact_match(merged_model, load_tokenizer(merged_dir), conversations, references)
    report = result.report
    table = Table(title=f"lorakit demo: date normalisation, {len(records)} test rows")
    table.add_column("model")
    table.add_column("exact match", justify="right")
    table.add_row("base SmolLM2-135M-Instruct", f"{100 * report['exact_match_base']:.0f}%")
    table.add_row(f"+ LoRA r={config.lora.r}, {report['steps']} steps ({report['trainable_params']:,} trainable params)",
                  f"{100 * report['exact_match_adapter']:.0f}%")
    table.add_row("merged (streaming merge)", f"{100 * merged_em:.0f}%")
    console.print(table)
    console.print(f"total {time.perf_counter() - started:,.0f} s; adapter: {result.adapter_dir}; merged model: {merged_dir}")
