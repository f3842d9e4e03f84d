"""GRPO on the bundled date task: (a) greedy exact match before/after `lorakit grpo` from the base model,
(b) `lorakit grpo` side by side with TRL's GRPOTrainer + PEFT, same settings, both in this invocation.

    .venv/bin/python benchmarks/grpo.py --part em --max-steps 60
    .venv/bin/python benchmarks/grpo.py --part trl --max-steps 10

Both parts train the embedded SmolLM2-135M-Instruct (fp32, CPU) from the base model with a fresh LoRA
adapter (r=8, alpha 16, all linear layers) and the exact-match reward against the answer of each bundled
training row (the prompt is the conversation before the answer, rendered with the chat template).

(a) runs `lorakit grpo` as its defaults say, with --max-steps, --learning-rate and --eval-every given here:
the report scores greedy answers of the base model and of the best adapter on the 100-row test split.

(b) runs each trainer in a fresh process (alternating, lorakit first): G completions per prompt, the same
prompts per step, learning rate, cosine schedule, warm-up, maximum completion length, temperature 1,
loss "grpo" with std-scaled advantages, β = 0, μ = 1, no evaluation. Reported: wall time of the training
call, peak RSS of the process, and the mean reward over the last half of the steps (each trainer's own
per-step log).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from harness import machine, markdown_table, run_child, save_results


def exact_match_reward(prompts, completions, answer, **columns) -> list[float]:
    """TRL's calling convention: conversational completions are message lists."""
    from lorakit.train.scoring import normalise_answer

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(normalise_answer(t) == normalise_answer(a)) for t, a in zip(texts, answer)]


def run_lorakit(output: str, args: argparse.Namespace, evaluate: bool) -> dict:
    from lorakit.train.data import bundled_dataset_path
    from lorakit.train.grpo import train_grpo
    from lorakit.train.grpo_config import GRPOConfig

    options = {"output": output, "max_steps": args.max_steps, "learning_rate": args.learning_rate,
               "num_generations": args.num_generations, "batch_size": args.batch_size,
               "max_completion_length": args.max_completion_length, "warmup_steps": args.warmup_steps,
               "overwrite": True, "eval_every": args.max_steps, "seed": args.seed}
    if not evaluate:  # no validation or test scoring: the training alone, as TRL runs it
        options["data"] = args.data or str(bundled_dataset_path("train"))
    result = train_grpo(GRPOConfig.from_options(options))
    rewards = [r["reward"] for r in _records(Path(output)) if r["kind"] == "train"]
    keys = (
        "exact_match_base",
        "exact_match_adapter",
        "base_val_loss",
        "best_val_loss",
        "steps",
        "train_seconds",
    )
    return {"train_seconds": result.report["train_seconds"], "rewards": rewards,
            **{k: result.report.get(k) for k in keys}}


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def run_trl(output: str, args: argparse.Namespace) -> dict:
    import datasets
    import peft
    from trl import GRPOConfig, GRPOTrainer

    from lorakit.models.sources import load_causal_lm, load_tokenizer
    from lorakit.train.data import bundled_dataset_path, load_records

    rows = [{"prompt": r["messages"][:-1], "answer": r["messages"][-1]["content"]}
            for r in load_records(args.data or bundled_dataset_path("train"))]
    config = GRPOConfig(
        output_dir=output,
        per_device_train_batch_size=args.batch_size * args.num_generations,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        max_steps=args.max_steps,
        temperature=1.0,
        top_p=1.0,
        loss_type="grpo",
        scale_rewards="group",
        beta=0.0,
        num_iterations=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=load_causal_lm(None),
        reward_funcs=exact_match_reward,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=load_tokenizer(None),
        peft_config=peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    return {"train_seconds": seconds, "rewards": rewards}


def child(variant: str, output: str, args: argparse.Namespace) -> None:
    start = time.perf_counter()
    if variant == "trl":
        result = run_trl(output, args)
    else:
        result = run_lorakit(output, args, evaluate=variant == "lorakit-em")
    result.update(variant=variant, wall_seconds=time.perf_counter() - start,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result))


def _late_mean(rewards: list[float]) -> float:
    late = rewards[len(rewards) // 2:]
    return sum(late) / max(1, len(late))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=("em", "trl", "both"), default="both")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="Both trainers' seed (data order, sampling).")
    parser.add_argument("--train-rows", type=int, default=None,
                        help="Side by side: train on the first N bundled training rows (both trainers).")
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "OUTPUT"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args)
        return
    root = Path(tempfile.mkdtemp(prefix="lorakit-bench-grpo-"))
    if args.train_rows:
        from lorakit.train.data import bundled_dataset_path

        lines = bundled_dataset_path("train").read_text(encoding="utf-8").splitlines()[:args.train_rows]
        args.data = str(root / "train.jsonl")
        Path(args.data).write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
              if k not in ("child", "part", "train_rows") and v is not None]
    payload: dict = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k != "child"}}
    if args.part in ("em", "both"):
        result = run_child([__file__, "--child", "lorakit-em", str(root / "em"), *common])
        payload["em"] = result
        print(json.dumps({k: v for k, v in result.items() if k != "rewards"}), file=sys.stderr, flush=True)
    if args.part in ("trl", "both"):
        rows = []
        for variant in ("lorakit", "trl"):
            result = run_child([__file__, "--child", variant, str(root / variant), *common])
            print(json.dumps(result), file=sys.stderr, flush=True)
            rows.append({"variant": variant, "train_seconds": result["train_seconds"],
                         "wall_seconds": result["wall_seconds"], "peak_rss_mb": result["peak_rss_mb"],
                         "late_mean_reward": _late_mean(result["rewards"]), "rewards": result["rewards"]})
        for row in rows:
            row["time_vs_trl"] = row["train_seconds"] / rows[1]["train_seconds"]
            row["memory_vs_trl"] = row["peak_rss_mb"] / rows[1]["peak_rss_mb"]
        payload["side_by_side"] = rows
        print(
            markdown_table(
                rows,
                [
                    ("variant", "variant"),
                    ("train_seconds", "train s"),
                    ("time_vs_trl", "time vs TRL"),
                    ("peak_rss_mb", "peak RSS MB"),
                    ("memory_vs_trl", "memory vs TRL"),
                    ("late_mean_reward", "mean reward, 2nd half"),
                ],
            )
        )
    save_results(f"grpo-{args.part}" + (f"-seed{args.seed}" if args.seed else ""), payload)


if __name__ == "__main__":
    main()
