"""Training step (forward + backward + AdamW) of lorakit vs PEFT 0.21.2, side by side, and the distance to
the machine's matmul limit.

    .venv/bin/python benchmarks/bench_train_step.py [--rounds 7]

Cases on the embedded SmolLM2-135M-Instruct (fp32, CPU), LoRA r=8, alpha 16, no dropout: targets
q_proj,v_proj and all-linear, batches of 2 × 128 and 8 × 64 tokens. Batches are SFT-shaped: random
tokens, loss on the last quarter of each row (the "answer"), as in answer-only fine-tuning. A fifth
case takes 8 real rows of the bundled chat data instead (59–67 tokens, loss on the answer; their first
36 tokens — system prompt and instruction — are the same in every row, which lorakit computes once:
`lorakit/train/shared_prefix.py`). Random tokens share no prefix, so the first four cases measure the
step without that saving.
lorakit's step is what `lorakit train` runs (`causal_lm_loss`: head + cross-entropy on supervised
positions only); PEFT's is the usual `model(..., labels=...).loss`. Both start from identical weights.
A third contender is lorakit with `lorakit train --compile` (decoder layers under torch.compile,
`lorakit/train/compile.py`; compiled during the warm-up rounds, so the medians are steady-state steps).

FLOPs are the useful work of a step with a frozen base: per token, forward and input-gradient matmuls of
every linear layer (2·params each way), attention (4·layers·seq·hidden each way), the LoRA factors and
their weight gradients, and the LM head on the supervised positions (forward and input gradient).
"""

from __future__ import annotations

import argparse
import copy

import torch
from harness import alternate, compare, machine, markdown_table, matmul_peak_flops, save_results

CASES = [("q,v", ["q_proj", "v_proj"], 2, 128), ("q,v", ["q_proj", "v_proj"], 8, 64),
         ("all-linear", "all-linear", 2, 128), ("all-linear", "all-linear", 8, 64),
         ("all-linear", "all-linear", 8, "chat")]


def make_batch(vocab: int, batch: int, length: int | str, seed: int = 0) -> dict[str, torch.Tensor]:
    if length == "chat":
        return chat_batch(batch)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    labels = ids.clone()
    labels[:, : length - length // 4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def chat_batch(batch: int) -> dict[str, torch.Tensor]:
    """The first `batch` rows of the bundled train split, tokenized and padded as `lorakit train` does."""
    from lorakit.models.sources import load_tokenizer
    from lorakit.train.data import bundled_dataset_path, load_records
    from lorakit.train.tokenize import collate, encode_example

    tokenizer = load_tokenizer(None)
    rows = load_records(bundled_dataset_path("train"))[:batch]
    return collate([encode_example(row, tokenizer, 256) for row in rows], tokenizer.pad_token_id)


def step_flops(model, batch: dict[str, torch.Tensor]) -> float:
    """Useful FLOPs of one training step (see the module docstring)."""

    config = model.config
    tokens = batch["input_ids"].numel()
    seq = batch["input_ids"].shape[1]
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    base = model.get_base_model()
    head = base.get_output_embeddings()
    # Frozen linear layers (LoRA layers' base layers included), and the LoRA factors (the trainable
    # nn.Linear).
    linear_params = sum(m.weight.numel() for m in base.modules()
                        if isinstance(m, torch.nn.Linear) and m is not head and not m.weight.requires_grad)
    lora_params = sum(p.numel() for p in base.parameters() if p.requires_grad)
    attention = 4 * config.num_hidden_layers * seq * config.hidden_size
    per_token = 2 * (2 * linear_params + attention) + 3 * 2 * lora_params
    return tokens * per_token + supervised * 2 * 2 * head.in_features * head.out_features


def build(targets, r: int = 8):
    """(lorakit model, PEFT model) with identical base and adapter weights."""
    import peft

    import lorakit
    from lorakit.models.sources import load_causal_lm

    base = load_causal_lm(None)
    torch.manual_seed(0)
    ours = lorakit.get_peft_model(
        copy.deepcopy(base), lorakit.LoraConfig(r=r, lora_alpha=16, target_modules=targets)
    )
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=16, target_modules=targets))
    theirs.load_state_dict(ours.state_dict(), strict=False)
    # B = 0 at init; give it values so that both compute a real LoRA update.
    with torch.no_grad():
        for (n1, p1), (_, p2) in zip(ours.named_parameters(), theirs.named_parameters()):
            if "lora_B" in n1:
                p1.normal_(0, 0.01)
                p2.copy_(p1)
    return ours, theirs


def lorakit_stepper(model, batch: dict[str, torch.Tensor]):
    from lorakit.train.loss import causal_lm_loss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        total, count = causal_lm_loss(model, **batch)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def run_case(
    targets, batch_size: int, length: int, rounds: int
) -> tuple[dict[str, float], dict[str, float], float]:
    """(timing summary lorakit vs PEFT, compiled lorakit vs PEFT, useful FLOPs per step) of one case."""
    from lorakit.train.compile import compiled_decoder_layers

    ours, theirs = build(targets)
    compiled = copy.deepcopy(ours)
    batch = make_batch(ours.config.vocab_size, batch_size, length)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4)

    def peft_step() -> None:
        theirs(**batch).loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    with compiled_decoder_layers(compiled):
        times = alternate(
            {
                "lorakit": lorakit_stepper(ours, batch),
                "compiled": lorakit_stepper(compiled, batch),
                "peft": peft_step,
            },
            rounds=rounds,
            warmup=2,
        )
    return compare(times), compare(times, "compiled"), step_flops(ours, batch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    peak = matmul_peak_flops()
    rows = []
    for name, targets, batch_size, length in CASES:
        summary, compiled, flops = run_case(targets, batch_size, length, args.rounds)
        shape = f"{batch_size} chat rows" if length == "chat" else f"{batch_size}×{length}"
        rows.append(
            {
                "targets": name,
                "batch": shape,
                **summary,
                "compiled_median_s": compiled["compiled_median_s"],
                "compiled_ratio_median": compiled["ratio_median"],
                "compiled_ratio_min": compiled["ratio_min"],
                "compiled_ratio_max": compiled["ratio_max"],
                "gflop_per_step": flops / 1e9,
                "lorakit_gflops": flops / summary["lorakit_median_s"] / 1e9,
                "peft_gflops": flops / summary["peft_median_s"] / 1e9,
                "peak_gflops": peak / 1e9,
                "lorakit_of_peak": flops / summary["lorakit_median_s"] / peak,
            }
        )
        print(rows[-1], flush=True)
    save_results("train_step", {"machine": machine(), "rows": rows})
    print(
        markdown_table(
            rows,
            [
                ("targets", "targets"),
                ("batch", "batch"),
                ("lorakit_median_s", "lorakit s/step"),
                ("peft_median_s", "PEFT s/step"),
                ("ratio_median", "ratio (median)"),
                ("compiled_median_s", "lorakit --compile s/step"),
                ("compiled_ratio_median", "--compile ratio (median)"),
                ("gflop_per_step", "GFLOP/step"),
                ("lorakit_gflops", "lorakit GFLOP/s"),
                ("peak_gflops", "torch.mm peak GFLOP/s"),
                ("lorakit_of_peak", "of peak"),
            ],
        )
    )


if __name__ == "__main__":
    main()
