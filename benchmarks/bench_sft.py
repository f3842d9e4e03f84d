"""End-to-end SFT: `lorakit train` vs the LoRA course's TRL + PEFT recipe, same model, data and settings.

    .venv/bin/python benchmarks/bench_sft.py [--rounds 1] [--max-steps N]

Both fine-tune the embedded SmolLM2-135M-Instruct (fp32, CPU) on the bundled date train split (1000
rows): LoRA r=8, alpha 16, all linear layers, batch 8, 1 epoch, AdamW lr 1e-3, cosine schedule, 10
warm-up steps, loss on the answer only (TRL: prompt/completion rows, its completion-only loss), no
gradient checkpointing, no evaluation during training. Each run is a fresh process: wall time of the
training call, peak RSS of the process. Afterwards both adapters are scored with the same greedy
exact-match on the 100-row test split.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import machine, markdown_table, run_child, save_results


def run_lorakit(output: str, max_steps: int | None) -> dict:
    from lorakit.train.config import TrainConfig
    from lorakit.train.data import bundled_dataset_path
    from lorakit.train.sft import train

    config = TrainConfig.from_options(
        {
            "output": output,
            "data": str(bundled_dataset_path("train")),
            "r": 8,
            "lora_alpha": 16,
            "target_modules": "all-linear",
            "batch_size": 8,
            "epochs": 1,
            "learning_rate": 1e-3,
            "warmup_steps": 10,
            "lr_scheduler": "cosine",
            "eval_every": 10_000,
            "max_steps": max_steps,
            "overwrite": True,
        }
    )
    result = train(config)
    return {"train_seconds": result.report["train_seconds"], "adapter": str(result.adapter_dir)}


def run_trl(output: str, max_steps: int | None) -> dict:
    import datasets
    import peft
    from trl import SFTConfig, SFTTrainer

    from lorakit.models.sources import load_causal_lm, load_tokenizer
    from lorakit.train.data import bundled_dataset_path, load_records

    rows = [
        {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}
        for r in load_records(bundled_dataset_path("train"))
    ]
    args = SFTConfig(
        output_dir=output,
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        max_steps=max_steps or -1,
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=False,
        use_cpu=True,
        max_length=256,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = SFTTrainer(
        model=load_causal_lm(None),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=load_tokenizer(None),
        peft_config=peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.model.save_pretrained(Path(output) / "adapter")
    return {"train_seconds": seconds, "adapter": str(Path(output) / "adapter")}


def child(variant: str, output: str, max_steps: int | None) -> None:
    start = time.perf_counter()
    result = (run_lorakit if variant == "lorakit" else run_trl)(output, max_steps)
    result.update(variant=variant, wall_seconds=time.perf_counter() - start,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result))


def exact_match(adapter: str) -> float:
    import lorakit
    from lorakit.models.sources import load_causal_lm, load_tokenizer
    from lorakit.train.data import bundled_dataset_path, load_records, prompt_messages, reference_answer
    from lorakit.train.evaluate import score_exact_match

    records = load_records(bundled_dataset_path("test"))
    model = lorakit.PeftModel.from_pretrained(load_causal_lm(None), adapter)
    score, _ = score_exact_match(model, load_tokenizer(None), [prompt_messages(r) for r in records],
                                 [reference_answer(r) for r in records])
    return score


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "OUTPUT"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.max_steps)
        return
    root = Path(tempfile.mkdtemp(prefix="lorakit-bench-sft-"))
    runs: dict[str, list[dict]] = {"lorakit": [], "trl+peft": []}
    for index in range(args.rounds):
        for variant in runs:
            extra = ["--max-steps", str(args.max_steps)] if args.max_steps else []
            runs[variant].append(
                run_child([__file__, "--child", variant, str(root / f"{variant}-{index}"), *extra])
            )
            print(runs[variant][-1], file=sys.stderr, flush=True)
    rows = []
    for variant, results in runs.items():
        rows.append(
            {
                "variant": variant,
                "train_seconds": statistics.median(r["train_seconds"] for r in results),
                "wall_seconds": statistics.median(r["wall_seconds"] for r in results),
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
                "exact_match": exact_match(results[-1]["adapter"]),
            }
        )
    for row in rows:
        row["time_vs_trl"] = row["train_seconds"] / rows[1]["train_seconds"]
        row["memory_vs_trl"] = row["peak_rss_mb"] / rows[1]["peak_rss_mb"]
    save_results("sft", {"machine": machine(), "rows": rows})
    print(
        markdown_table(
            rows,
            [
                ("variant", "variant"),
                ("train_seconds", "train s"),
                ("time_vs_trl", "time vs TRL"),
                ("peak_rss_mb", "peak RSS MB"),
                ("memory_vs_trl", "memory vs TRL"),
                ("exact_match", "exact match"),
            ],
        )
    )


if __name__ == "__main__":
    main()
