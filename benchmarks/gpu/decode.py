"""Decoding with adapters on the Llama-3.2-1B shape (bf16 base and factors): lorakit vs PEFT and the base.

    python benchmarks/gpu/decode.py --out $OUT/decode.json [--tiny]

- mixed: 32 rows, each naming one of 8 LoRA adapters (r=16, every linear layer), in one `generate` call with
  `adapter_names`, lorakit against PEFT;
- single: one adapter active and unmerged (lorakit) against the plain base model (no LoRA layers at
  all), at 32 rows and at 1 row.

Greedy decoding of a fixed number of new tokens after a 128-token prompt (`min_new_tokens` = `max_new_tokens`,
so no row stops early); tokens/s counts new tokens of all rows. Contenders alternate, one warm-up each, then
the median of the timed rounds. The adapters' B factors are random and small (init_lora_weights=False, then
× 0.01), so every adapter changes the outputs and no value overflows.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from common import arguments, device, environment, llama, peak_memory_gb, reset_memory, sync, write_json

ADAPTERS = 8
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)


def adapters(library, base, names: list[str]):
    model = library.get_peft_model(base, library.LoraConfig(**LORA), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, library.LoraConfig(**LORA))
    return model


def build(where: torch.device, tiny: bool, names: list[str]):
    """(lorakit model, PEFT model with the same factors), bf16 throughout, eval mode, adapter 0 active."""
    import peft

    import lorakit

    torch.manual_seed(0)
    ours = adapters(lorakit, llama("llama-3.2-1b", tiny, where), names)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.mul_(0.01)
    theirs = adapters(peft, llama("llama-3.2-1b", tiny, where), names)
    theirs.load_state_dict(ours.state_dict())
    for model in (ours, theirs):
        model.to(torch.bfloat16).eval()
        model.set_adapter(names[0])  # rebuilds lorakit's per-layer inference plan for the new dtype
    return ours, theirs


def generator(
    model,
    rows: int,
    prompt: int,
    new: int,
    vocab: int,
    where: torch.device,
    adapter_names: list[str] | None = None,
) -> Callable[[], None]:
    ids = torch.randint(3, vocab, (rows, prompt), generator=torch.Generator().manual_seed(rows)).to(where)
    kwargs: dict[str, Any] = {} if adapter_names is None else {"adapter_names": adapter_names}

    @torch.no_grad()
    def run() -> None:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            **kwargs,
        )
        assert out.shape == (rows, prompt + new)

    return run


def race(contenders: dict[str, Callable[[], None]], where: torch.device, rounds: int) -> dict[str, float]:
    """Median seconds per call of each contender, run in turn (A B A B ...) after one warm-up each."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for index in range(rounds + 1):
        for name, run in contenders.items():
            sync(where)
            start = time.perf_counter()
            run()
            sync(where)
            if index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def tokens_per_s(seconds: dict[str, float], rows: int, new: int) -> dict[str, float]:
    return {name: round(rows * new / s, 1) for name, s in seconds.items()}


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    where, started = device(), time.perf_counter()
    rows, prompt, new, rounds = (8, 8, 4, 1) if args.tiny else (32, 128, 64, 3)
    names = [f"a{i}" for i in range(ADAPTERS)]
    report: dict[str, Any] = {
        "environment": environment(where),
        "lora": LORA,
        "adapters": ADAPTERS,
        "prompt_tokens": prompt,
        "new_tokens": new,
    }
    reset_memory(where)
    ours, theirs = build(where, args.tiny, names)
    vocab = ours.config.vocab_size
    mixed = [names[i % ADAPTERS] for i in range(rows)]
    seconds = race(
        {
            "lorakit": generator(ours, rows, prompt, new, vocab, where, mixed),
            "peft": generator(theirs, rows, prompt, new, vocab, where, mixed),
        },
        where,
        rounds,
    )
    speed = tokens_per_s(seconds, rows, new)
    report["mixed"] = {
        "rows": rows,
        "tokens_per_s": speed,
        "lorakit_vs_peft": round(speed["lorakit"] / speed["peft"], 3),
    }
    write_json(args.out, report)
    base = theirs.unload()  # the plain transformers model: no LoRA layers left
    report["single"] = {}
    for batch in (rows, 1):
        seconds = race(
            {
                "base": generator(base, batch, prompt, new, vocab, where),
                "lorakit": generator(ours, batch, prompt, new, vocab, where),
            },
            where,
            rounds,
        )
        speed = tokens_per_s(seconds, batch, new)
        report["single"][f"rows_{batch}"] = {
            "tokens_per_s": speed,
            "lorakit_vs_base": round(speed["lorakit"] / speed["base"], 3),
        }
        write_json(args.out, report)
    report["peak_memory_gb"] = peak_memory_gb(where)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
