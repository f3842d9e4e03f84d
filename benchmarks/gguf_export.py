"""GGUF in, GGUF out: the embedded model, fine-tuned, merged and exported, answers the date task as the merge.

    .venv/bin/python benchmarks/gguf_export.py [--max-steps N] [--rows N] [--adapter DIR] [--output DIR]

1. LoRA-fine-tune the embedded SmolLM2-135M-Instruct (itself converted from a GGUF) on the bundled date
   task (r=8, alpha 16, all linear layers, batch 8, lr 1e-3; one epoch unless --max-steps), or take
   --adapter.
2. Merge it (`lorakit merge`, float32) and export base + adapter to GGUF f16 and q8_0 (`lorakit export`),
   and the adapter alone to a GGUF LoRA adapter.
3. Score greedy exact match on the test split for the merged safetensors model and both GGUF files,
   loaded by transformers (`gguf_file=`, tokenizer and chat template from the GGUF alone); top-1
   agreement with the merged model over every token of the test conversations and over their distinct
   contexts (the shared system prompt and instruction once), the merge's logit gap at each disagreement,
   and perplexity.
4. With llama-cpp-python installed (`make llama-cpp`): exact match in llama.cpp itself, for the f16 file
   and for the f32 base + the GGUF adapter.

Prints one JSON line (also saved as benchmarks/results/gguf_export.json when run in full).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorakit.train.data import bundled_dataset_path, load_records, prompt_messages, reference_answer


def train_adapter(output: Path, max_steps: int | None) -> Path:
    from lorakit.train.config import TrainConfig
    from lorakit.train.sft import train

    config = TrainConfig.from_options({
        "output": str(output), "data": str(bundled_dataset_path("train")), "r": 8, "lora_alpha": 16,
        "target_modules": "all-linear", "batch_size": 8, "epochs": 1, "learning_rate": 1e-3,
        "warmup_steps": 10, "lr_scheduler": "cosine", "eval_every": 10_000, "max_steps": max_steps,
        "overwrite": True})
    return train(config).adapter_dir


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# logits: a disagreement where the merge itself ranks its top-1 and the model's pick this close is a near-tie
NEAR_TIE = 0.1


@torch.no_grad()
def token_statistics(model, reference, tokenizer, records) -> dict[str, float]:
    """Top-1 agreement with `reference` and perplexity of both, over every next-token position of the
    test conversations (chat template applied).

    The conversations share their system prompt and instruction (the date task's first 36 tokens), so
    those positions recur in every row with the same context and one flip there counts once per row.
    Agreement is also given over distinct contexts (each token prefix once); for each such disagreement
    the gap is the reference's logit of its own top-1 minus its logit of the model's pick.
    """
    agree = total = distinct_agree = 0
    seen: set[tuple[int, ...]] = set()
    gaps: list[float] = []
    nll = {"model": 0.0, "reference": 0.0}
    for record in records:
        text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        row = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([row])
        logits = {"model": model(ids).logits[0, :-1], "reference": reference(ids).logits[0, :-1]}
        targets = ids[0, 1:]
        picked, expected = logits["model"].argmax(-1), logits["reference"].argmax(-1)
        agree += int((picked == expected).sum())
        total += len(targets)
        for position in range(len(targets)):
            if tuple(row[:position + 1]) in seen:
                continue
            seen.add(tuple(row[:position + 1]))
            if picked[position] == expected[position]:
                distinct_agree += 1
            else:
                scores = logits["reference"][position]
                gaps.append(float(scores[expected[position]] - scores[picked[position]]))
        for name, value in logits.items():
            nll[name] += float(torch.nn.functional.cross_entropy(value, targets, reduction="sum"))
    return {"top1_agreement": agree / total, "positions": total,
            "top1_agreement_distinct": distinct_agree / len(seen), "contexts": len(seen),
            "disagreements_distinct": len(gaps), "near_ties": sum(gap < NEAR_TIE for gap in gaps),
            "largest_gap": max(gaps, default=0.0), "perplexity": math.exp(nll["model"] / total),
            "perplexity_merged": math.exp(nll["reference"] / total)}


def llama_cpp_exact_match(model_path: Path, records, lora: Path | None = None) -> float:
    """Greedy answers of llama.cpp itself (argmax at every step, stop at end-of-generation)."""
    import llama_cpp

    from lorakit.train.scoring import exact_match, normalise_answer

    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora) if lora else None, n_ctx=512,
                          n_threads=2, verbose=False, seed=0)
    answers = []
    for record in records:
        messages = prompt_messages(record)
        # temperature 0 is llama.cpp's greedy sampler; the chat template is the one the GGUF carries
        completion = llm.create_chat_completion(messages=messages, max_tokens=24, temperature=0.0)
        answers.append(normalise_answer(completion["choices"][0]["message"]["content"]))
    return exact_match(answers, [reference_answer(r) for r in records])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--rows", type=int, default=None, help="Score the first N test rows (default: all).")
    parser.add_argument("--adapter", type=Path, default=None, help="A trained adapter of the embedded model.")
    parser.add_argument("--output", type=Path, default=None, help="Working directory (default: a new one).")
    args = parser.parse_args()
    work = args.output or Path(tempfile.mkdtemp(prefix="gguf-export-"))
    work.mkdir(parents=True, exist_ok=True)
    result = run(work, args)
    if args.rows is None and args.max_steps is None and args.adapter is None:
        from harness import machine, save_results

        save_results("gguf_export", {"machine": machine(), **result})
    print(json.dumps(result))
    return 0


def stage(text: str) -> None:
    print(f"== {text}", file=sys.stderr, flush=True)


def run(work: Path, args: argparse.Namespace) -> dict:
    from lorakit.export import export_adapter_gguf, export_gguf
    from lorakit.merge.streaming import merge_checkpoint
    from lorakit.models.sources import load_causal_lm, load_tokenizer
    from lorakit.train.evaluate import score_exact_match

    start = time.perf_counter()
    adapter = args.adapter or train_adapter(work / "train", args.max_steps)
    train_seconds = time.perf_counter() - start
    stage("merge and export")
    merge_checkpoint(None, [adapter], work / "merged", overwrite=True)
    reports = {kind: export_gguf(None, work / f"model-{kind}.gguf", [adapter], type=kind, overwrite=True)
               for kind in ("f16", "q8_0")}
    export_gguf(None, work / "base-f32.gguf", type="f32", overwrite=True)
    export_adapter_gguf(None, adapter, work / "adapter.gguf", type="f32", overwrite=True)
    records = load_records(bundled_dataset_path("test"))[: args.rows]
    conversations = [prompt_messages(r) for r in records]
    references = [reference_answer(r) for r in records]
    stage("score the merged model")
    merged = load_causal_lm(str(work / "merged")).eval()
    merged_tokenizer = load_tokenizer(str(work / "merged"))
    result = {"rows": len(records), "max_steps": args.max_steps, "train_seconds": round(train_seconds, 1),
              "exact_match_merged": score_exact_match(merged, merged_tokenizer, conversations, references)[0]}
    for kind, report in reports.items():
        stage(f"score the {kind} GGUF in transformers")
        model, tokenizer = load_gguf(work / f"model-{kind}.gguf")
        stats = token_statistics(model, merged, tokenizer, records)
        result[kind] = {"exact_match": score_exact_match(model, tokenizer, conversations, references)[0],
                        "bytes": report.total_bytes, "export_seconds": report.seconds, **stats}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        result["llama_cpp"] = None
    else:
        stage("score in llama.cpp")
        result["llama_cpp"] = {
            "exact_match_f16": llama_cpp_exact_match(work / "model-f16.gguf", records),
            "exact_match_base_plus_adapter": llama_cpp_exact_match(work / "base-f32.gguf", records,
                                                                   work / "adapter.gguf"),
        }
    return result


if __name__ == "__main__":
    sys.exit(main())
