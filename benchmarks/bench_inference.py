"""Inference side by side with PEFT 0.21.2: generation speed, adapter loading and switching, mixed batches.

    .venv/bin/python benchmarks/bench_inference.py [--rounds 5]

On the embedded SmolLM2-135M-Instruct (fp32, CPU), LoRA r=8 on all linear layers (non-zero B):

* generation: tokens/s of greedy decoding (batch 4, 32 new tokens) for the base model, the unmerged adapter
  and the merged adapter, each library's own PeftModel;
* loading: seconds to load one saved adapter onto a loaded base (`PeftModel.from_pretrained` /
  `load_adapter`), and `set_adapter` switch time with 10 adapters loaded;
* mixed batch: one forward + greedy generation of a batch of 16 rows using 4 adapters and the base
  (`adapter_names=[...]`) — lorakit's stacked-factor path vs PEFT's per-adapter loop.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from harness import alternate, compare, machine, markdown_table, save_results


def saved_adapters(base, count: int, root: Path) -> list[Path]:
    import lorakit

    paths = []
    for index in range(count):
        torch.manual_seed(index)
        model = lorakit.get_peft_model(
            copy.deepcopy(base),
            lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
        )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.01)
        paths.append(root / f"adapter{index}")
        model.save_pretrained(paths[-1])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import peft

    import lorakit
    from lorakit.models.sources import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    base = load_causal_lm(None).eval()
    tokenizer = load_tokenizer(None)
    root = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    adapters = saved_adapters(base, 10, root)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Normalize this date: 5 March 2021"}],
                                           add_generation_prompt=True, tokenize=False)
    encoded = tokenizer([prompt] * 4, return_tensors="pt")
    rows = []

    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), adapters[0]).eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[0])).eval()
    new_tokens = 32

    def generator(model):
        def run() -> None:
            with torch.no_grad():
                model.generate(
                    **encoded,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
        return run

    tokens = encoded["input_ids"].shape[0] * new_tokens
    times = alternate(
        {"base": generator(base), "lorakit": generator(ours), "peft": generator(theirs)}, args.rounds
    )
    base_s = compare(times, "lorakit", "base")["base_median_s"]
    unmerged = compare(times)
    rows.append(
        {"case": "generate: base", "lorakit": tokens / base_s, "peft": tokens / base_s, "unit": "tok/s"}
    )
    rows.append(
        {
            "case": "generate: unmerged adapter",
            "lorakit": tokens / unmerged["lorakit_median_s"],
            "peft": tokens / unmerged["peft_median_s"],
            "unit": "tok/s",
            "vs_base": base_s / unmerged["lorakit_median_s"],
        }
    )
    merged_ours = ours.merge_and_unload()
    merged_theirs = theirs.merge_and_unload()
    times = alternate(
        {"lorakit": generator(merged_ours), "peft": generator(merged_theirs), "base": generator(base)},
        args.rounds,
    )
    merged = compare(times)
    rows.append({"case": "generate: merged adapter", "lorakit": tokens / merged["lorakit_median_s"],
                 "peft": tokens / merged["peft_median_s"], "unit": "tok/s",
                 "vs_base": compare(times, "lorakit", "base")["base_median_s"] / merged["lorakit_median_s"]})
    del merged_ours, merged_theirs, ours, theirs

    def load_ours() -> None:
        lorakit.PeftModel.from_pretrained(base, adapters[1]).unload()

    def load_theirs() -> None:
        peft.PeftModel.from_pretrained(base, str(adapters[1])).unload()

    times = alternate({"lorakit": load_ours, "peft": load_theirs}, args.rounds)
    result = compare(times)
    rows.append(
        {
            "case": "load one adapter",
            "lorakit": result["lorakit_median_s"] * 1e3,
            "peft": result["peft_median_s"] * 1e3,
            "unit": "ms",
            "ratio": result["ratio_median"],
        }
    )

    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), adapters[0], adapter_name="a0").eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[0]), adapter_name="a0").eval()
    for index, path in enumerate(adapters[1:], start=1):
        ours.load_adapter(path, adapter_name=f"a{index}")
        theirs.load_adapter(str(path), adapter_name=f"a{index}")
    cycle = {"n": 0}

    def switcher(model):
        def run() -> None:
            for _ in range(10):
                cycle["n"] = (cycle["n"] + 1) % 10
                model.set_adapter(f"a{cycle['n']}")
        return run

    times = alternate({"lorakit": switcher(ours), "peft": switcher(theirs)}, args.rounds)
    result = compare(times)
    rows.append(
        {
            "case": "set_adapter (10 loaded)",
            "lorakit": result["lorakit_median_s"] * 1e2,
            "peft": result["peft_median_s"] * 1e2,
            "unit": "ms/switch",
            "ratio": result["ratio_median"],
        }
    )

    names = (["a0", "a1", "a2", "a3", "__base__"] * 4)[:16]
    batch = tokenizer([prompt] * 16, return_tensors="pt")

    def mixed(model):
        def run() -> None:
            with torch.no_grad():
                model.generate(
                    **batch,
                    adapter_names=names,
                    max_new_tokens=16,
                    min_new_tokens=16,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
        return run

    times = alternate({"lorakit": mixed(ours), "peft": mixed(theirs)}, args.rounds)
    result = compare(times)
    mixed_tokens = 16 * 16
    rows.append(
        {
            "case": "mixed batch 16 rows, 4 adapters + base",
            "lorakit": mixed_tokens / result["lorakit_median_s"],
            "peft": mixed_tokens / result["peft_median_s"],
            "unit": "tok/s",
            "ratio": 1 / result["ratio_median"],
        }
    )
    save_results("inference", {"machine": machine(), "rows": rows})
    print(markdown_table(rows, [("case", "case"), ("lorakit", "lorakit"), ("peft", "PEFT"), ("unit", "unit"),
                                ("vs_base", "lorakit vs base speed"), ("ratio", "ratio")]))


if __name__ == "__main__":
    main()
