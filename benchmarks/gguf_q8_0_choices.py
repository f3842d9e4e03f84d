"""Which matrices q8_0 quantizes, and what that does to top-1 agreement with the float32 model.

    .venv/bin/python benchmarks/gguf_q8_0_choices.py [--model DIR] [--rows N] [--variants a,b]

Each variant rounds the chosen matrices of the model (default: the embedded SmolLM2-135M-Instruct, or a
merged checkpoint with --model) through the `gguf` package's q8_0 quantizer and dequantizer, which is
what an exported q8_0 file holds and what transformers' GGUF loader gives back, and scores every
next-token position of the first N test conversations of the date task against the float32 model:
agreement over all positions and over distinct contexts (each token prefix once: the conversations share
their system prompt and instruction), how many flips are near-ties (the float32 model's margin between
its top-1 and the flipped-to token < 0.1), the largest such margin, the RMS change of the logits and the
perplexity. Prints one JSON line per variant; figures in benchmarks/README.md (GGUF export).
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from gguf import GGMLQuantizationType, quants

from lorakit.models.sources import load_causal_lm, load_tokenizer
from lorakit.train.data import bundled_dataset_path, load_records

Q8_0 = GGMLQuantizationType.Q8_0
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# variant → does a matrix of this name get q8_0 (else: float32, or f16 where named)
VARIANTS = {
    "every_matrix": lambda name: "q8_0",
    "embedding_f16": lambda name: "f16" if "embed_tokens" in name else "q8_0",
    "attention_only": lambda name: "q8_0" if any(m in name for m in ATTENTION) else None,
    "mlp_only": lambda name: "q8_0" if any(m in name for m in MLP) else None,
    "every_matrix_bf16": lambda name: "bf16",
}


def rounded(weight: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "q8_0":
        stored = quants.quantize(weight.float().contiguous().numpy(), Q8_0)
        return torch.from_numpy(quants.dequantize(stored, Q8_0)).reshape(weight.shape)
    return weight.to(torch.float16 if kind == "f16" else torch.bfloat16).float()


def conversations(tokenizer, rows: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Token ids of each templated test conversation, and a mask of the positions whose context (the
    token prefix up to it) is seen for the first time, in the order the logits are concatenated."""
    inputs, fresh, seen = [], [], set()
    for record in load_records(bundled_dataset_path("test"))[:rows]:
        text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        row = tokenizer(text, add_special_tokens=False)["input_ids"]
        inputs.append(torch.tensor([row]))
        for position in range(len(row) - 1):
            fresh.append(tuple(row[:position + 1]) not in seen)
            seen.add(tuple(row[:position + 1]))
    return inputs, torch.tensor(fresh)


@torch.no_grad()
def logits(model, inputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([model(ids).logits[0, :-1].float() for ids in inputs])


def statistics(got: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor,
               fresh: torch.Tensor) -> dict[str, float]:
    picked, expected = got.argmax(-1), reference.argmax(-1)
    rows = torch.arange(len(picked))
    margin = reference[rows, expected] - reference[rows, picked]
    flips = (picked != expected) & fresh
    return {"agreement": float((picked == expected).float().mean()), "positions": len(picked),
            "agreement_distinct": 1 - float(flips.sum()) / int(fresh.sum()), "contexts": int(fresh.sum()),
            "flips_distinct": int(flips.sum()), "near_ties": int((margin[flips] < 0.1).sum()),
            "largest_margin": float(margin[picked != expected].max()) if (picked != expected).any() else 0.0,
            "logit_rms_change": float((got - reference).pow(2).mean().sqrt()),
            "perplexity": math.exp(float(torch.nn.functional.cross_entropy(got, targets)))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="A float32 checkpoint (default: the embedded model).")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    model, tokenizer = load_causal_lm(args.model).eval(), load_tokenizer(args.model)
    inputs, fresh = conversations(tokenizer, args.rows)
    targets = torch.cat([ids[0, 1:] for ids in inputs])
    reference = logits(model, inputs)
    print(json.dumps({"variant": "float32", "perplexity": math.exp(float(
        torch.nn.functional.cross_entropy(reference, targets)))}), flush=True)
    original = {name: value.clone() for name, value in model.state_dict().items()}
    if model.config.tie_word_embeddings:  # one tensor: rounded as the embedding, as the file stores it
        original.pop("lm_head.weight", None)
    for variant in args.variants.split(","):
        choose = VARIANTS[variant]
        model.load_state_dict({name: rounded(value, choose(name)) if value.dim() == 2 and choose(name)
                               else value for name, value in original.items()}, strict=False)
        stats = statistics(logits(model, inputs), reference, targets, fresh)
        print(json.dumps({"variant": variant, **{k: round(v, 5) for k, v in stats.items()}}), flush=True)
    model.load_state_dict(original, strict=False)


if __name__ == "__main__":
    main()
