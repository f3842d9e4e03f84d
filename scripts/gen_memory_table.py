"""Print docs/distributed.md's per-GPU memory table: LoRA r=16 on every linear layer of Llama-3.1-8B and
Llama-3.1-70B (models built on the meta device from their configs), data parallel vs FSDP2 on 1/2/4/8
GPUs, with a bf16 base and with an NF4 (4-bit) base. The formula is `lorakit.train.memory.rank_memory`.

    python scripts/gen_memory_table.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.train.memory import frozen_bytes, lora_parameters, rank_memory

MODELS = {
    "Llama-3.1-8B": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "Llama-3.1-70B": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
}
NF4_BYTES = 0.5 + 4 / 64  # packed 4-bit weights + one float32 absmax per block of 64
GPUS = (1, 2, 4, 8)


def main() -> None:
    print(
        "| model | base | LoRA params | strategy | "
        + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in GPUS)
        + " |"
    )
    print("|---|---|---:|---|" + "---:|" * len(GPUS))
    for name, dims in MODELS.items():
        config = LlamaConfig(vocab_size=128256, tie_word_embeddings=False, **dims)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        lora = lora_parameters(model, r=16)
        for base, stored in (("bf16", frozen_bytes(model, 2)), ("NF4", frozen_bytes(model, 2, NF4_BYTES))):
            for strategy, sharded in (("DDP", False), ("FSDP2", True)):
                cells = [rank_memory(stored, lora, n, sharded).total / 2**30 for n in GPUS]
                print(f"| {name} | {base} | {lora / 1e6:.1f} M | {strategy} | "
                      + " | ".join(f"{c:.1f} GiB" for c in cells) + " |")


if __name__ == "__main__":
    main()
