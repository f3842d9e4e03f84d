"""Peak memory of `lorakit merge` on issue 23's 1 GB float32 Llama (vocabulary 32,000, hidden 1,024,
MLP 4,096, 10 layers, untied embedding and head: 131 MB each, 933 MB in all) with a LoRA r=16 adapter
on every linear layer, read from 100 MB shards and from one file; output in 100 MB shards, verified.
PEFT's merge_and_unload + save_pretrained on the same files beside it.

    PYTHONPATH=src nice -n 10 .venv/bin/python benchmarks/merge_memory.py [--compare-src /work/main/src]

Each merge runs as `python -m lorakit merge` in a fresh process; its peak RSS is the process's own
(VmHWM, polled), less the peak RSS of a fresh `python -c "import torch, transformers"` (the issue's baseline).
--compare-src runs the same merges with another checkout's sources (e.g. the previous implementation).
Files go under --workdir (default /work/bigtmp/merge-memory) and are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from harness import import_baseline_rss, machine, markdown_table, run_measured, save_results

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MB = 10**6
CHECKPOINT_BYTES = 933_318_656


def write_inputs(root: Path) -> dict[str, Path]:
    import torch
    from transformers import LlamaConfig

    from lorakit.io.synthetic import write_random_adapter, write_random_checkpoint

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=10,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    bases = {"100MB shards": root / "base-sharded", "single file": root / "base-single"}
    write_random_checkpoint(bases["100MB shards"], config, torch.float32, 100 * MB)
    write_random_checkpoint(bases["single file"], config, torch.float32, 2**40)
    write_random_adapter(root / "adapter", config, 16, LINEAR)
    return bases


PEFT = ("import sys, torch, peft, transformers\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
        "peft.PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3], "
        "max_shard_size='100MB')\n")


def peft_row(base: Path, root: Path, baseline: int) -> dict:
    """PEFT's merge_and_unload + save_pretrained on the same files: the whole model in memory."""
    run = run_measured([sys.executable, "-c", PEFT, str(base), str(root / "adapter"), str(root / "peft")])
    shutil.rmtree(root / "peft")
    extra = run["peak_rss_bytes"] - baseline
    return {"layout": "100MB shards", "code": "PEFT 0.21.2", "seconds": run["seconds"],
            "peak_rss_mb": run["peak_rss_bytes"] / MB, "above_baseline_mb": extra / MB,
            "ratio_to_checkpoint": extra / CHECKPOINT_BYTES}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/work/bigtmp/merge-memory")
    parser.add_argument("--compare-src", default=None, help="another src/ to measure the same way")
    parser.add_argument("--reuse", action="store_true", help="reuse inputs left in --workdir")
    parser.add_argument("--no-peft", action="store_true")
    args = parser.parse_args()
    root = Path(args.workdir)
    if not args.reuse:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    try:
        if args.reuse and (root / "adapter").is_dir():
            bases = {"100MB shards": root / "base-sharded", "single file": root / "base-single"}
        else:
            bases = write_inputs(root)
        baseline = import_baseline_rss()
        sources = {"this checkout": None, **({"compare": args.compare_src} if args.compare_src else {})}
        rows = []
        for label, src in sources.items():
            for layout, base in bases.items():
                out = root / "merged"
                env = {"PYTHONPATH": src} if src else None
                argv = [sys.executable, "-m", "lorakit", "merge", "--model", str(base), "--adapter",
                        str(root / "adapter"), "-o", str(out), "--max-shard-size", "100MB"]
                run = run_measured(argv, env)
                report = json.loads((out / "merge_report.json").read_text())
                memory = report.get("memory", {})
                extra = run["peak_rss_bytes"] - baseline
                largest = 32000 * 1024 * 4
                rows.append({
                    "layout": layout, "code": label, "seconds": run["seconds"],
                    "peak_rss_mb": run["peak_rss_bytes"] / MB, "above_baseline_mb": extra / MB,
                    "bound_mb": (2 * largest + 64 * 2**20) / MB,
                    "within_bound": extra <= 2 * largest + 64 * 2**20,
                    "report_measured_mb": memory.get("measured_peak_above_start_bytes", 0) / MB or None,
                    "report_predicted_mb": memory.get("predicted_peak_above_start_bytes", 0) / MB or None,
                    "verified": (report.get("verification") or {}).get("passed"),
                })
                shutil.rmtree(out)
                print(json.dumps(rows[-1]), flush=True)
        if not args.no_peft:
            rows.append(peft_row(bases["100MB shards"], root, baseline))
            print(json.dumps(rows[-1]), flush=True)
        payload = {"machine": machine(), "baseline_rss_mb": baseline / MB,
                   "checkpoint_mb": CHECKPOINT_BYTES / MB, "rows": rows}
        save_results("merge_memory", payload)
        print(f"import torch, transformers baseline: {baseline / MB:.0f} MB")
        print(markdown_table(rows, [("layout", "input"), ("code", "code"), ("seconds", "s"),
                                    ("peak_rss_mb", "peak RSS MB"),
                                    ("above_baseline_mb", "above baseline MB"),
                                    ("bound_mb", "bound MB"), ("within_bound", "within"),
                                    ("report_measured_mb", "report: measured MB"),
                                    ("report_predicted_mb", "report: predicted MB"),
                                    ("verified", "verified")]))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
