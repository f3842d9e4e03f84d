"""Merge time and peak memory: lorakit's streaming merge and in-memory merge vs PEFT's merge_and_unload +
save_pretrained, each in a fresh process, alternating, on the embedded SmolLM2-135M-Instruct (fp32
checkpoint, ~540 MB) with a LoRA r=16 adapter on all linear layers.

    .venv/bin/python benchmarks/bench_merge.py [--rounds 3]

Peak memory is the child's peak RSS minus the RSS after `import torch, transformers` (the same for all).
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

VARIANTS = ("lorakit-streaming", "lorakit-in-memory", "peft")


def child(variant: str, adapter: str, output: str) -> None:
    import psutil
    import torch  # noqa: F401
    import transformers  # noqa: F401

    baseline = psutil.Process().memory_info().rss / 2**20
    from lorakit.models.sources import resolve_model_source

    base_dir = str(resolve_model_source(None))
    start = time.perf_counter()
    if variant == "lorakit-streaming":
        from lorakit.merge.streaming import merge_checkpoint

        merge_checkpoint(base_dir, adapter, output, verify=False, max_shard_size="100MB")
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        if variant == "peft":
            import peft

            merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
        else:
            import lorakit

            merged = lorakit.PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(output, max_shard_size="100MB")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps({"variant": variant, "seconds": seconds, "peak_rss_mb": peak, "baseline_rss_mb": baseline})
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "ADAPTER", "OUTPUT"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    import torch

    import lorakit
    from lorakit.models.sources import load_causal_lm, resolve_model_source

    root = Path(tempfile.mkdtemp(prefix="lorakit-bench-merge-"))
    torch.manual_seed(0)
    model = lorakit.get_peft_model(
        load_causal_lm(None),
        lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False),
    )
    model.save_pretrained(root / "adapter")
    del model
    size_mb = sum(p.stat().st_size for p in resolve_model_source(None).glob("*.safetensors")) / 2**20
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for index in range(args.rounds):
        for variant in VARIANTS:
            out = root / f"{variant}-{index}"
            results[variant].append(
                run_child([__file__, "--child", variant, str(root / "adapter"), str(out)])
            )
            print(results[variant][-1], flush=True, file=sys.stderr)
    rows = []
    for variant, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        extra = statistics.median(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in runs)
        rows.append(
            {"variant": variant, "seconds": seconds, "peak_extra_mb": extra, "of_checkpoint": extra / size_mb}
        )
    peft_row = rows[-1]
    for row in rows:
        row["time_vs_peft"] = row["seconds"] / peft_row["seconds"]
        row["memory_vs_peft"] = row["peak_extra_mb"] / peft_row["peak_extra_mb"]
    save_results("merge", {"machine": machine(), "checkpoint_mb": size_mb, "rows": rows})
    print(f"checkpoint: {size_mb:.0f} MB fp32")
    print(
        markdown_table(
            rows,
            [
                ("variant", "variant"),
                ("seconds", "time s"),
                ("time_vs_peft", "time vs PEFT"),
                ("peak_extra_mb", "peak RSS above baseline MB"),
                ("of_checkpoint", "× checkpoint"),
                ("memory_vs_peft", "memory vs PEFT"),
            ],
        )
    )


if __name__ == "__main__":
    main()
