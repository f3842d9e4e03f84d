"""QLoRA at Llama-3.1-8B shape on this CPU (issue 23): the checkpoint of benchmarks/scale_8b.py loaded
in 4-bit NF4 (double quantization, float32 compute: lorakit's --load-in-4bit path, `quantization_config`
+ `prepare_for_kbit_training`), LoRA r=16 on every linear projection, AdamW, batch 1 × 256 tokens,
gradient checkpointing, a few steps.

    PYTHONPATH=src nice -n 10 .venv/bin/python benchmarks/scale_8b.py --keep-base
    PYTHONPATH=src nice -n 10 .venv/bin/python benchmarks/qlora_8b.py --base /work/bigtmp/scale8b/base
    rm -r /work/bigtmp/scale8b

Runs in a fresh process; resident memory is read from /proc/self/status (VmRSS, and a 20 ms sampler for
the peak within each step), split into: weights (RSS after loading and preparing, less the
`import torch, transformers` baseline; also the bytes of every tensor the model holds, 4-bit codes and
quantization state counted), LoRA factors and their gradients (bytes of the trainable parameters),
optimizer state (bytes of AdamW's exp_avg and exp_avg_sq after the first step), and activations with
the step's temporaries (peak RSS within a step less the RSS at its start less the gradients). The tokens
are random ids (memory and time do not depend on them); the weights are random, so the loss means nothing.
--stop-above-gb stops the run (exit, no crash) when the anonymous memory (RssAnon) passes it, or when the
machine's MemAvailable falls under 3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

from harness import machine, mem_available, save_results

GB = 10**9


def rss(field: str = "VmRSS") -> int:
    """This process's resident memory in bytes: VmRSS (all of it) or RssAnon (anonymous memory only)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """Peak VmRSS and peak RssAnon seen since `reset`, sampled every 20 ms; exits the process when the
    anonymous memory passes `limit` bytes or the machine's MemAvailable falls under 3 GB (never push the
    machine into the OOM killer). The limit is on RssAnon because VmRSS also counts the pages of the
    checkpoint transformers memory-maps while loading, which the kernel drops when memory is short."""

    def __init__(self, limit: int) -> None:
        self.limit, self.peak, self.peak_anon = limit, 0, 0
        threading.Thread(target=self._run, daemon=True).start()

    def reset(self) -> None:
        self.peak, self.peak_anon = rss(), rss("RssAnon")

    def _run(self) -> None:
        while True:
            now, anon = rss(), rss("RssAnon")
            self.peak, self.peak_anon = max(self.peak, now), max(self.peak_anon, anon)
            if anon > self.limit or mem_available() < 3 * GB:
                print(json.dumps({"stopped": f"RssAnon {anon / GB:.1f} GB (limit {self.limit / GB:.1f}), "
                                             f"MemAvailable {mem_available() / GB:.1f} GB"}), flush=True)
                os._exit(3)
            time.sleep(0.02)


def tensor_bytes(model) -> dict[str, int]:
    """Bytes of every storage the model holds, once: 4-bit codes, their quantization state, the rest."""
    seen, out = set(), {"4bit_codes": 0, "quant_state": 0, "other": 0}
    for module in model.modules():
        for param in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if param.untyped_storage().data_ptr() in seen:
                continue
            seen.add(param.untyped_storage().data_ptr())
            size = param.untyped_storage().nbytes()
            state = getattr(param, "quant_state", None)
            if state is not None:
                out["4bit_codes"] += size
                for value in _state_tensors(state):
                    out["quant_state"] += value.untyped_storage().nbytes()
            else:
                out["other"] += size
    return out


def _state_tensors(state):
    import torch

    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif hasattr(value, "absmax"):
            yield from _state_tensors(value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--stop-above-gb", type=float, default=18.0)
    args = parser.parse_args()
    import torch
    import transformers  # noqa: F401

    result: dict = {"baseline_rss_bytes": rss(), "threads": torch.get_num_threads(), "seq": args.seq}
    sampler = Sampler(int(args.stop_above_gb * GB))
    import lorakit
    from lorakit.models.sources import load_causal_lm
    from lorakit.quant import prepare_for_kbit_training, quantization_config

    sampler.reset()
    start = time.perf_counter()
    model = load_causal_lm(args.base, dtype=torch.bfloat16,
                           quantization_config=quantization_config(load_in_4bit=True))
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    model.config.use_cache = False
    result.update(load_seconds=time.perf_counter() - start, load_peak_rss_bytes=sampler.peak,
                  load_peak_anon_bytes=sampler.peak_anon, weights_anon_bytes=rss("RssAnon"),
                  weights_rss_bytes=rss() - result["baseline_rss_bytes"],
                  weights_tensor_bytes=tensor_bytes(model))
    print(json.dumps(result), flush=True)
    config = lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    model = lorakit.get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result["lora_bytes"] = sum(p.numel() * p.element_size() for p in trainable)
    result["lora_parameters"] = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    generator = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(args.steps):
        ids = torch.randint(0, model.config.vocab_size, (1, args.seq), generator=generator)
        before = rss()
        sampler.reset()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        steps.append({"seconds": seconds, "loss": float(loss), "rss_before": before, "peak_rss": sampler.peak,
                      "peak_anon": sampler.peak_anon,
                      "activations_and_temporaries": sampler.peak - before - result["lora_bytes"]})
        print(json.dumps(steps[-1]), flush=True)
    result["optimizer_bytes"] = sum(v.numel() * v.element_size() for s in optimizer.state.values()
                                    for v in s.values() if isinstance(v, torch.Tensor))
    result["steps"] = steps
    result["peak_rss_bytes"] = max(s["peak_rss"] for s in steps)
    result["peak_anon_bytes"] = max(s["peak_anon"] for s in steps)
    result["machine"] = machine()
    print(json.dumps(result), flush=True)
    save_results("qlora_8b", result)


if __name__ == "__main__":
    main()
