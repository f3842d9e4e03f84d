"""`lorakit demo` (the README's first command): fine-tune the embedded model on the bundled task, merge
the adapter with verification, and compare exact match of base vs LoRA vs merged on the test split."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lorakit.cli.app import app
from lorakit.cli.options import config_command
from lorakit.options import Options, option, positive_ints


@dataclass
class DemoConfig(Options):
    """Every option of `lorakit demo`."""

    output: str = option("runs/demo", help="Where the run, the adapter and the merged model go.")
    max_steps: int | None = option(None, help="Optimizer steps (default: one epoch).")

    def validate(self) -> None:
        positive_ints(self, (), ("max_steps",))


def _demo(options: DemoConfig) -> None:
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
    output = Path(options.output)
    config = TrainConfig(output=str(output / "train"), overwrite=True, max_steps=options.max_steps)
    result = train(config)
    console.rule("2/3  Streaming merge with verification")
    merged_dir = output / "merged"
    merge = merge_checkpoint(None, result.adapter_dir, merged_dir, overwrite=True, progress=True)
    check = merge.verification
    console.print(f"merged {merge.tensors_merged} tensors, copied {merge.tensors_copied}; verification "
                  f"{'passed' if check and check.passed else 'FAILED'}; "
                  f"peak RSS {merge.peak_rss_bytes / 2**20:,.0f} MB")
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
    lora = (f"+ LoRA r={config.lora.r}, {report['steps']} steps "
            f"({report['trainable_params']:,} trainable params)")
    table.add_row(lora, f"{100 * report['exact_match_adapter']:.0f}%")
    table.add_row("merged (streaming merge)", f"{100 * merged_em:.0f}%")
    console.print(table)
    console.print(f"total {time.perf_counter() - started:,.0f} s; adapter: {result.adapter_dir}; "
                  f"merged model: {merged_dir}")


app.command("demo")(config_command(DemoConfig, _demo))
