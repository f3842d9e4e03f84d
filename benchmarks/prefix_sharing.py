"""Prefix sharing on and off, alternating: an SFT step and a DPO step on the bundled data.

    .venv/bin/python benchmarks/prefix_sharing.py [--rounds 5]

The embedded SmolLM2-135M-Instruct (fp32, CPU), LoRA r=8 on all linear layers, no dropout. SFT: the
first 8 rows of the bundled date train split, loss on the answer (`causal_lm_loss`, forward + backward).
DPO: the first 8 bundled preference pairs, 16 rows (`PreferenceLoss`: the policy pass, the reference
pass with the adapter disabled, backward). Every row starts with the same 36 tokens (system prompt and
instruction). "off" is the same code with sharing disabled, so the ratio is what sharing alone buys.
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_train_step import chat_batch
from harness import alternate, compare, machine, markdown_table, save_results

import lorakit
import lorakit.train.shared_prefix as shared_prefix


def sharing(enabled: bool) -> None:
    # An unreachable efficiency threshold makes `_pays` refuse every batch.
    shared_prefix.EFFICIENT_TOKENS = 128 if enabled else 10**12


def with_sharing(step, enabled: bool):
    def run() -> None:
        sharing(enabled)
        step()
    return run


def sft_step():
    from lorakit.models.sources import load_causal_lm
    from lorakit.train.loss import causal_lm_loss

    model = lorakit.get_peft_model(load_causal_lm(None), lorakit.LoraConfig(r=8, lora_alpha=16,
                                                                             target_modules="all-linear")).train()
    batch = chat_batch(8)

    def step() -> None:
        total, count = causal_lm_loss(model, **batch)
        (total / count).backward()

    return step, batch["input_ids"]


def dpo_step():
    from lorakit.models.sources import load_causal_lm, load_tokenizer
    from lorakit.train.dpo_loss import PreferenceLoss
    from lorakit.train.preference_data import bundled_preference_path, collate_pairs, encode_pair

    tokenizer = load_tokenizer(None)
    lines = bundled_preference_path("train").read_text(encoding="utf-8").splitlines()[:8]
    batch = collate_pairs(
        [encode_pair(json.loads(line), tokenizer, 256) for line in lines], tokenizer.pad_token_id
    )
    model = lorakit.get_peft_model(load_causal_lm(None), lorakit.LoraConfig(r=8, lora_alpha=16,
                                                                             target_modules="all-linear")).train()
    loss_fn = PreferenceLoss(model, beta=0.1)

    def step() -> None:
        losses, _, _ = loss_fn.pair_losses(batch["input_ids"], batch["attention_mask"], batch["labels"])
        losses.sum().backward()

    return step, batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for name, make in [("SFT step, 8 rows", sft_step), ("DPO step, 8 pairs", dpo_step)]:
        step, ids = make()
        times = alternate(
            {"on": with_sharing(step, True), "off": with_sharing(step, False)}, rounds=args.rounds, warmup=1
        )
        rows.append({"case": name, "rows × length": "×".join(map(str, ids.shape)),
                     "shared": shared_prefix.shared_prefix_length(ids), **compare(times, "on", "off")})
        print(rows[-1], flush=True)
    sharing(True)
    save_results(
        "prefix_sharing", {"machine": machine(), "torch_threads": torch.get_num_threads(), "rows": rows}
    )
    print(
        markdown_table(
            rows,
            [
                ("case", "case"),
                ("rows × length", "rows × length"),
                ("shared", "shared tokens"),
                ("on_median_s", "sharing on, s"),
                ("off_median_s", "off, s"),
                ("ratio_median", "on / off (median)"),
            ],
        )
    )


if __name__ == "__main__":
    main()
