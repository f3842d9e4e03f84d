"""Peak memory of DPO: the reference as the policy with its adapter off (lorakit) vs an explicit frozen copy.

    .venv/bin/python benchmarks/dpo_memory.py                  # every variant, a markdown table on stdout
    .venv/bin/python benchmarks/dpo_memory.py --steps 3 --batch-sizes 1 8

DPO needs log π_ref for every pair. A trainer that cannot switch an adapter off keeps a second, frozen
copy of the model for it; lorakit computes π_ref with the policy's own weights and the adapter disabled,
so the only weights in memory are the base's (once) and the adapter's. The saving should therefore be
about one copy of the weights: half of the weight memory of the copy variant.

Variants, each in a fresh Python process (peak RSS, `ru_maxrss`, only ever grows, so variants must not
share a process), all on the embedded SmolLM2-135M-Instruct in float32 on the CPU, LoRA r=8 on all linear
layers, AdamW, the same bundled preference pairs in the same order:

    adapter-off   π_ref = the policy inside `disable_adapter()` (lorakit dpo's default)
    precomputed   π_ref log-probs computed once before the steps (lorakit dpo --precompute-ref)
    copy          π_ref = `copy.deepcopy` of the frozen base model, made before the adapter is added

Peak RSS also holds the activations of the policy's forward pass, which grow with the batch while the
weights do not, so the variants run at several batch sizes: at one pair per step the weights dominate.
The losses are printed to show that every variant trains the same way. On a GPU the script reports the
CUDA allocator peak instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys

VARIANTS = ("adapter-off", "precomputed", "copy")


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_variant(variant: str, steps: int, batch_size: int) -> dict:
    """Train `steps` DPO steps with the given reference; return the memory figures."""
    import torch

    import lorakit
    from lorakit.models.sources import load_causal_lm, load_tokenizer
    from lorakit.train.dpo_loss import PreferenceLoss, precompute_reference, sequence_logps
    from lorakit.train.preference_data import (
        build_preference_datasets,
        bundled_preference_path,
        collate_pairs,
    )

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(None)
    pairs, _, _ = build_preference_datasets(bundled_preference_path("train"), tokenizer, max_seq_len=256)
    pairs = pairs[: steps * batch_size]
    base = load_causal_lm(None).to(device)
    base.config.use_cache = False
    weights_mb = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20

    class CopiedReference(PreferenceLoss):
        """π_ref from a separate frozen model instead of the policy with its adapter off."""

        def __init__(self, policy, reference) -> None:
            super().__init__(policy, beta=0.1)
            self.reference = reference

        def reference_logps(self, input_ids, attention_mask, labels):
            pairs = input_ids.shape[0]
            flat = (t.reshape(2 * pairs, -1) for t in (input_ids, attention_mask, labels))
            with torch.no_grad():
                return sequence_logps(self.reference, *flat).view(pairs, 2)

    reference = copy.deepcopy(base).eval().requires_grad_(False) if variant == "copy" else None
    policy = lorakit.get_peft_model(base, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    loss = PreferenceLoss(policy, beta=0.1) if reference is None else CopiedReference(policy, reference)
    if variant == "precomputed":
        precompute_reference(loss, pairs, batch_size, tokenizer.pad_token_id, device)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=5e-4)
    policy.train()
    losses = []
    for step in range(steps):
        batch = collate_pairs(pairs[step * batch_size:(step + 1) * batch_size], tokenizer.pad_token_id)
        pair_losses, _, _ = loss.pair_losses(**{k: v.to(device) for k, v in batch.items()})
        mean = pair_losses.mean()
        mean.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(mean.item(), 4))
    return {
        "variant": variant,
        "batch_size": batch_size,
        "peak_mb": _peak_mb(device),
        "weights_mb": weights_mb,
        "losses": losses,
        "device": device.type,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variant", choices=VARIANTS, help="run one variant in this process (used internally)"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8],
                        help="preference pairs per step (two sequences each); every variant runs at each")
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.batch_sizes[0])))
        return 0
    rows = []
    for batch_size in args.batch_sizes:
        for variant in VARIANTS:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--variant",
                    variant,
                    "--steps",
                    str(args.steps),
                    "--batch-sizes",
                    str(batch_size),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    weights = rows[0]["weights_mb"]
    print(f"{args.steps} steps, device={rows[0]['device']}, base weights {weights:,.0f} MiB\n")
    print("| pairs/step | reference | peak memory (MiB) | vs adapter-off (MiB) | losses |")
    print("|---:|---|---:|---:|---|")
    for r in rows:
        ours = next(
            o["peak_mb"] for o in rows if o["batch_size"] == r["batch_size"] and o["variant"] == "adapter-off"
        )
        print(f"| {r['batch_size']} | {r['variant']} | {r['peak_mb']:,.0f} | {r['peak_mb'] - ours:+,.0f} | "
              f"{', '.join(map(str, r['losses']))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
