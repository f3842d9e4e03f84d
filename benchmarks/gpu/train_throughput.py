"""Training throughput of lorakit against PEFT on the same bf16 base and the same batch (gpu/run.sh).

    python benchmarks/gpu/train_throughput.py --out $OUT/train.json [--tiny]

For each shape (Llama-3.2-1B; Llama-3.1-8B with gradient checkpointing): sequence length 2048, every row's
first half masked (-100) as SFT masks prompts, LoRA r=16 on every linear layer, float32 factors and AdamW
states, the forward under bf16 autocast. The batch is the largest PEFT fits (1, 2, 4, ... rows until out of
memory); lorakit runs that batch too.

- "peft": PEFT's model with transformers' forward and loss (`model(..., labels=...).loss`).
- "lorakit": lorakit's model and loss (`train/loss.py`: the head and cross-entropy only on answer tokens).
- "lorakit+liger": the same with liger-kernel's RMSNorm/RoPE/SwiGLU (only where liger-kernel is installed).
- "lorakit+compile": the same with its decoder layers compiled (`--compile`; the 1B shape, time allowing).

Reported per contender: tokens/s (all input tokens), peak GPU memory (weights included) and MFU: model
FLOPs per token × tokens/s over the 8192³ bf16 matmul rate measured here. Model FLOPs of a LoRA step on a
frozen base: forward 2·N (N: the weights of every matmul, the head included) + attention 2·S·H·d_head per
layer (QKᵀ and AV, causal: half of S); backward 2·N (activation gradients only: the base has no weight
gradients) + twice the forward's attention. LoRA's own FLOPs and checkpointing's recomputation are not
counted, and both libraries are credited with the full head, which lorakit skips on prompt tokens.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from common import (
    arguments,
    device,
    environment,
    llama,
    llama_config,
    matmul_tflops,
    peak_memory_gb,
    reset_memory,
    timed,
    write_json,
)

LORA = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
ROWS = (1, 2, 4, 8, 16, 32, 64)


def make_batch(rows: int, length: int, vocab: int, where: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(rows)
    ids = torch.randint(3, vocab, (rows, length), generator=generator)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # answer-only: the first half is prompt
    return {
        "input_ids": ids.to(where),
        "attention_mask": torch.ones_like(ids).to(where),
        "labels": labels.to(where),
    }


def flops_per_token(config: Any, length: int) -> float:
    """Model FLOPs of one trained token (see the module docstring)."""
    d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attention_weights = d * heads * head_dim * 2 + d * kv * head_dim * 2
    matmul_weights = config.num_hidden_layers * (attention_weights + 3 * d * config.intermediate_size)
    matmul_weights += config.vocab_size * d
    attention = config.num_hidden_layers * 2 * length * heads * head_dim
    return 2 * matmul_weights + attention + 2 * matmul_weights + 2 * attention


def build(
    library: str, shape: str, tiny: bool, where: torch.device, checkpointing: bool, liger: bool = False
):
    base = llama(shape, tiny, where)
    if liger:
        from lorakit.train.kernels import apply_liger

        apply_liger(base, where)
    if library == "peft":
        import peft

        model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
    else:
        import lorakit

        model = lorakit.get_peft_model(base, lorakit.LoraConfig(task_type="CAUSAL_LM", **LORA))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable), "LoRA factors are float32"
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=where.type == "cuda" or None)
    return model, optimizer


def stepper(library: str, model, optimizer, batch: dict[str, torch.Tensor], where: torch.device):
    """One optimizer step on `batch` with `library`'s loss, the forward under bf16 autocast."""
    from lorakit.train.loss import causal_lm_loss

    def step() -> None:
        with torch.autocast(where.type, dtype=torch.bfloat16):
            if library == "peft":
                loss = model(**batch).loss
            else:
                total, count = causal_lm_loss(model, **batch)
                loss = total / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def largest_peft_batch(
    shape: str, tiny: bool, where: torch.device, length: int, checkpointing: bool, vocab: int
) -> int:
    """The most rows (of ROWS) whose PEFT step fits in memory."""
    model, optimizer = build("peft", shape, tiny, where, checkpointing)
    fits = 0
    for rows in ROWS[:3] if tiny else ROWS:
        try:
            stepper("peft", model, optimizer, make_batch(rows, length, vocab, where), where)()
            fits = rows
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            break
    del model, optimizer
    reset_memory(where)
    return fits


def measure(
    name: str,
    shape: str,
    tiny: bool,
    where: torch.device,
    rows: int,
    length: int,
    checkpointing: bool,
    per_token: float,
    peak_tflops: float,
) -> dict[str, Any]:
    from lorakit.train.compile import compiled_decoder_layers

    library = "peft" if name == "peft" else "lorakit"
    reset_memory(where)
    model, optimizer = build(library, shape, tiny, where, checkpointing, liger=name == "lorakit+liger")
    batch = make_batch(rows, length, model.config.vocab_size, where)
    step = stepper(library, model, optimizer, batch, where)
    with compiled_decoder_layers(model, name == "lorakit+compile"):
        started = time.perf_counter()
        step()  # warm-up (and the compilation)
        warmup = time.perf_counter() - started
        step()
        reset_memory(where)
        seconds = timed(step, where, 2 if tiny else 3)
    tokens = rows * length / seconds
    result = {
        "rows": rows,
        "seq_len": length,
        "step_s": round(seconds, 4),
        "warmup_s": round(warmup, 2),
        "tokens_per_s": round(tokens, 1),
        "peak_memory_gb": peak_memory_gb(where),
        "mfu": round(per_token * tokens / (peak_tflops * 1e12), 4),
    }
    del model, optimizer, batch, step
    reset_memory(where)
    return result


def extras(shape: str, where: torch.device) -> list[str]:
    """The lorakit variants measured once both libraries have been on both shapes (time allowing)."""
    names = []
    if where.type == "cuda":
        try:
            import liger_kernel  # noqa: F401

            names.append("lorakit+liger")
        except ImportError:
            pass
    if shape == "llama-3.2-1b":
        names.append("lorakit+compile")
    return names


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    where, started = device(), time.perf_counter()
    length = 32 if args.tiny else 2048
    report: dict[str, Any] = {
        "environment": environment(where),
        "matmul": matmul_tflops(where, args.tiny),
        "lora": LORA,
        "answer_fraction": 0.5,
        "shapes": {},
    }
    peak = report["matmul"]["tflops"]
    shapes = {"llama-3.2-1b": False, "llama-3.1-8b": True}  # shape: gradient checkpointing
    plan = [(shape, name) for shape in shapes for name in ("peft", "lorakit")]
    plan += [(shape, name) for shape in shapes for name in extras(shape, where)]
    for shape, name in plan:
        checkpointing, config = shapes[shape], llama_config(shape, args.tiny)
        if shape not in report["shapes"]:
            rows = largest_peft_batch(shape, args.tiny, where, length, checkpointing, config.vocab_size)
            report["shapes"][shape] = {
                "gradient_checkpointing": checkpointing,
                "rows": rows,
                "flops_per_token": flops_per_token(config, length),
                "results": {},
                "skipped": [],
            }
        entry = report["shapes"][shape]
        if time.perf_counter() - started > args.budget:
            entry["skipped"].append(name)
            continue
        try:
            entry["results"][name] = measure(
                name,
                shape,
                args.tiny,
                where,
                entry["rows"],
                length,
                checkpointing,
                entry["flops_per_token"],
                peak,
            )
        except torch.OutOfMemoryError:
            entry["results"][name] = {"rows": entry["rows"], "error": "out of memory"}
            reset_memory(where)
        results = entry["results"]
        if (
            name == "lorakit"
            and "tokens_per_s" in results.get("peft", {})
            and "tokens_per_s" in results[name]
        ):
            peft_memory = results["peft"]["peak_memory_gb"]
            entry["lorakit_vs_peft"] = {
                "tokens_per_s": round(results[name]["tokens_per_s"] / results["peft"]["tokens_per_s"], 3),
                "peak_memory": round(results[name]["peak_memory_gb"] / peft_memory, 3)
                if peft_memory
                else None,
            }
        write_json(args.out, report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
