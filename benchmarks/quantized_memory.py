"""Memory and quality of LoRA on a quantized base: float32 vs 8-bit (LLM.int8()) vs 4-bit (QLoRA NF4).

    .venv/bin/python benchmarks/quantized_memory.py                 # all three, a markdown table on stdout
    .venv/bin/python benchmarks/quantized_memory.py --steps 30 --json out.json

The model is the embedded SmolLM2-135M-Instruct (float32 checkpoint), loaded with
`lorakit.models.sources.load_causal_lm(None, quantization_config=lorakit.quant.quantization_config(...))`:
8-bit, or 4-bit NF4 with double quantization and float32 compute (the CPU defaults). Every measurement
runs in a fresh Python process, because peak RSS (`ru_maxrss`) only ever grows:

- footprint: load the model and count the bytes of every tensor it holds, each storage once (tied
  embeddings share one): parameters, buffers, and the bitsandbytes quantization state that is neither
  (8-bit row scales; 4-bit block absmax, nested absmax and code tables). Split into the quantized linear
  layers and the rest (embeddings, norms), which stays float32. Also the peak RSS while loading and the
  resident memory after it, split into anonymous (allocated by the process) and file-backed (mapped
  files: the memory-mapped float32 checkpoint, shared libraries) from /proc/self/status.
- training: `lorakit.train.sft.train` on the bundled demo data (LoRA r=8 on all linear layers, AdamW
  lr 1e-3, batch 8, the same seed, data and steps for every variant), which loads through
  `quantization_config` and `prepare_for_kbit_training` for the quantized ones. Reported: validation loss
  of the base before training and of the adapter after `--steps` steps on the bundled validation split,
  seconds per step, the process's peak RSS (on a GPU, the CUDA allocator peak) and its peak anonymous RSS.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

VARIANTS = ("fp32", "int8", "nf4")
LABELS = {"fp32": "float32", "int8": "8-bit (LLM.int8)", "nf4": "4-bit NF4 + double quant"}
MB = 2**20


def _quantization(variant: str) -> dict:
    """load_in_8bit / load_in_4bit flags of a variant (both False for float32)."""
    return {"load_in_8bit": variant == "int8", "load_in_4bit": variant == "nf4"}


def _memory_mb() -> dict[str, float]:
    """Resident memory of this process from /proc (Linux): anonymous (what the process allocated) and
    file-backed (mapped files: the memory-mapped checkpoint, shared libraries)."""
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return {
        key: int(fields[name].split()[0]) / 1024 for key, name in (("anon", "RssAnon"), ("file", "RssFile"))
    }


class PeakSampler:
    """Largest anonymous RSS seen, sampled every 50 ms on a thread (ru_maxrss has no anonymous-only form)."""

    def __init__(self) -> None:
        self.peak_anon = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_anon = max(self.peak_anon, _memory_mb()["anon"])

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak_anon, _memory_mb()["anon"])


def _quant_state_tensors(module) -> list:
    """Tensors a bitsandbytes layer holds outside its parameters and buffers."""
    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        state = weight.quant_state
        tensors = [state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        return tensors
    return [t for t in (weight.SCB, module.state.SCB, module.state.CB) if t is not None]


def footprint(variant: str) -> dict:
    """Bytes of the loaded model's tensors (quantized linear layers / the rest) and the RSS after loading."""
    import torch
    import transformers  # noqa: F401  (imported before the baseline, as load_causal_lm imports it)

    from lorakit import quant
    from lorakit.models.sources import load_causal_lm

    baseline = _memory_mb()["anon"]
    flags = _quantization(variant)
    kwargs = {"quantization_config": quant.quantization_config(**flags)} if any(flags.values()) else {}
    model = load_causal_lm(None, **kwargs)
    head = model.get_output_embeddings()
    seen: set[int] = set()
    sizes = {"linear": 0, "rest": 0}
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if quant.is_quantized(module):
            tensors += _quant_state_tensors(module)
        # "linear": the layers the quantized variants quantize, i.e. every linear layer but lm_head.
        part = "linear" if isinstance(module, torch.nn.Linear) and module is not head else "rest"
        for tensor in tensors:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                sizes[part] += tensor.numel() * tensor.element_size()
    # Loading a quantized model reads float32 tensors and quantizes them; hand the freed heap back to the
    # system first, so that the anonymous RSS is what the loaded model keeps.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    memory = _memory_mb()
    return {"linear_mb": sizes["linear"] / MB, "other_mb": sizes["rest"] / MB,
            "total_mb": (sizes["linear"] + sizes["rest"]) / MB, "anon_before_load_mb": baseline,
            "anon_after_load_mb": memory["anon"], "file_after_load_mb": memory["file"],
            "peak_load_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB


def training(variant: str, steps: int, batch_size: int) -> dict:
    """One `lorakit train` run; its validation losses, speed and peak memory."""
    from lorakit.train.config import TrainConfig
    from lorakit.train.data import bundled_dataset_path
    from lorakit.train.sft import train

    sampler = PeakSampler()
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig.from_options(dict(
            output=out, overwrite=True, data=str(bundled_dataset_path("train")),
            validation_data=str(bundled_dataset_path("validation")), max_steps=steps, batch_size=batch_size,
            eval_every=10 * steps, warmup_steps=0, seed=0, **_quantization(variant),
        ))
        report = train(config).report
    return {
        key: report[key] for key in ("base_val_loss", "final_val_loss", "final_train_loss", "peak_memory_mb")
    } | {
        "peak_anon_mb": sampler.stop(),
        "seconds_per_step": report["train_seconds"] / max(report["steps"], 1),
    }


def run_child(args: list[str]) -> dict:
    """Run this script with `args` in a fresh process and return the JSON it prints last."""
    done = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict]) -> str:
    base = results["fp32"]["footprint"] if "fp32" in results else None
    rows = [
        "| base | linear layers MB | rest MB | model MB | vs float32 (linear / model) | load: peak RSS MB "
        "| after load: anon / file RSS MB | training: peak RSS / peak anon MB | base val loss | val loss "
        "after | s/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, result in results.items():
        f, t = result["footprint"], result["training"]
        ratio = (f"{base['linear_mb'] / f['linear_mb']:.2f}x / {base['total_mb'] / f['total_mb']:.2f}x"
                 if base else "-")
        rows.append(
            f"| {LABELS[variant]} | {f['linear_mb']:.1f} | {f['other_mb']:.1f} | {f['total_mb']:.1f} | "
            f"{ratio} "
            f"| {f['peak_load_mb']:.0f} | {f['anon_after_load_mb']:.0f} / {f['file_after_load_mb']:.0f} "
            f"| {t['peak_memory_mb']:.0f} / {t['peak_anon_mb']:.0f} | {t['base_val_loss']:.4f} "
            f"| {t['final_val_loss']:.4f} | {t['seconds_per_step']:.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=("footprint", "training"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "footprint":
        print(json.dumps(footprint(args.variant)))
        return
    if args.child == "training":
        print(json.dumps(training(args.variant, args.steps, args.batch_size)))
        return
    results: dict[str, dict] = {}
    for variant in args.variants.split(","):
        started = time.perf_counter()
        results[variant] = {
            "footprint": run_child(["--child", "footprint", "--variant", variant]),
            "training": run_child(["--child", "training", "--variant", variant, "--steps", str(args.steps),
                                   "--batch-size", str(args.batch_size)]),
        }
        print(f"{variant}: done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
