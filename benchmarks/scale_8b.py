"""`lorakit merge` and `lorakit export` at Llama-3.1-8B shape on this machine (issue 23).

    PYTHONPATH=src nice -n 10 .venv/bin/python benchmarks/scale_8b.py [--workdir /work/bigtmp/scale8b]
        [--keep-base]   # leave the base checkpoint for benchmarks/qlora_8b.py (delete it after!)

1. Writes a bfloat16 checkpoint from Llama-3.1-8B's config (written here in code: 32 layers, hidden 4,096,
   MLP 14,336, GQA 32/8 heads, vocabulary 128,256, untied), random weights generated block by block,
   in 5 GB shards (16.06 GB), SmolLM2's tokenizer beside it (the GGUF export needs one), and a LoRA r=16
   adapter on all seven linear projections of every layer (float32).
2. Measures the disk in the same run: write a 2 GiB file (fsync), evict it from the page cache
   (posix_fadvise DONTNEED on the synced file: dropping the whole cache needs root), read it back, copy
   it (read + write + fsync), and read 2 GiB of the checkpoint cold (the read rate the floor uses: see
   `checkpoint_read_rate`). The merge's floor is reading 16 GB and writing 16 GB at those rates.
3. `lorakit merge` (5 GB output shards, verification on: it re-reads base and output) and `lorakit export
   --type f16` (on the same weights under Llama-3-8B's config: the export refuses Llama-3.1's rope
   scaling), each a fresh process: wall time, peak RSS (VmHWM, polled) less the `import torch, transformers`
   baseline, GB/s of weights written.
4. PEFT `merge_and_unload` + `save_pretrained` on the same files (it needs the whole model in memory),
   killed if the machine's MemAvailable falls under 1 GB; the result records how far it got.
Everything is deleted at the end (the base too unless --keep-base).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from harness import import_baseline_rss, machine, mem_available, run_measured, save_results

GB = 10**9
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama31_8b_config(layers: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        architectures=["LlamaForCausalLM"], torch_dtype="bfloat16",
    )


def write_inputs(root: Path, layers: int) -> dict:
    import torch

    from lorakit.io.synthetic import write_random_adapter, write_random_checkpoint
    from lorakit.models.sources import resolve_model_source

    config = llama31_8b_config(layers)
    start = time.perf_counter()
    size = write_random_checkpoint(root / "base", config, torch.bfloat16, 5 * GB)
    seconds = time.perf_counter() - start
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(resolve_model_source(None) / name, root / "base" / name)
    modules = write_random_adapter(root / "adapter", config, 16, LINEAR)
    return {"checkpoint_bytes": size, "largest_tensor_bytes": 128256 * 4096 * 2, "write_seconds": seconds,
            "shards": len(list((root / "base").glob("*.safetensors"))), "adapter_modules": modules,
            "adapter_bytes": (root / "adapter" / "adapter_model.safetensors").stat().st_size}


def disk_rates(root: Path, size: int = 2 * 2**30) -> dict:
    """Write, cold read and copy rates (bytes/s) of a `size`-byte file under `root`."""
    chunk = os.urandom(64 * 2**20)
    source, copy = root / "disk-probe.bin", root / "disk-probe-copy.bin"
    start = time.perf_counter()
    with open(source, "wb") as fh:
        for _ in range(size // len(chunk)):
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    write = size / (time.perf_counter() - start)
    buffer = bytearray(len(chunk))
    start = time.perf_counter()
    fd = os.open(source, os.O_RDONLY)
    while os.readv(fd, [buffer]):
        pass
    read = size / (time.perf_counter() - start)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.lseek(fd, 0, os.SEEK_SET)
    start = time.perf_counter()
    with open(copy, "wb") as out:
        while got := os.readv(fd, [buffer]):
            out.write(memoryview(buffer)[:got])
        out.flush()
        os.fsync(out.fileno())
    copied = size / (time.perf_counter() - start)
    os.close(fd)
    source.unlink()
    copy.unlink()
    return {"probe_bytes": size, "write_Bps": write, "probe_read_Bps": read, "copy_Bps": copied,
            "read_Bps": checkpoint_read_rate(root / "base", size)}


def checkpoint_read_rate(base: Path, size: int) -> float:
    """Cold read rate (bytes/s) of `size` bytes from the middle of the checkpoint's largest shard.

    The probe file above was written a moment before it is read, and this virtual disk then serves it from
    the host's cache (1.5 GB/s read back, against ~0.5 GB/s for a shard written minutes earlier): the rate
    the merge sees is the checkpoint's own."""
    shard = max(base.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    offset = max(0, (shard.stat().st_size - size) // 2)
    buffer = bytearray(64 * 2**20)
    fd = os.open(shard, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start, done = time.perf_counter(), 0
        while done < size and (got := os.preadv(fd, [buffer], offset + done)):
            done += got
        seconds = time.perf_counter() - start
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return done / seconds


def llama3_view(root: Path) -> Path:
    """The same weights under Llama-3-8B's config (identical shapes, default rope): lorakit's GGUF export
    refuses Llama-3.1's "llama3" rope scaling with a one-line error (not exported yet)."""
    view = root / "base-llama3"
    view.mkdir()
    for path in (root / "base").iterdir():
        if path.name != "config.json":
            (view / path.name).symlink_to(path)
    config = json.loads((root / "base" / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    config["max_position_embeddings"] = 8192
    (view / "config.json").write_text(json.dumps(config, indent=2))
    return view


def lorakit(args: list[str]) -> dict:
    return run_measured([sys.executable, "-m", "lorakit", *args])


def peft_merge(root: Path, baseline: int) -> dict:
    """PEFT's merge_and_unload + save_pretrained, which holds the whole model in memory. It runs with a
    guard: if MemAvailable falls under 1 GB the process is killed (before the OOM killer picks one) and
    the result says how far it got."""
    result = {"mem_available_bytes": mem_available()}
    code = ("import sys, torch, peft, transformers\n"
            "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n"
            "peft.PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3], "
            "max_shard_size='5GB')\n")
    run = run_measured([sys.executable, "-c", code, str(root / "base"), str(root / "adapter"),
                        str(root / "peft")], min_available_bytes=GB)
    result.update(seconds=run["seconds"], peak_rss_bytes=run["peak_rss_bytes"],
                  above_baseline_bytes=run["peak_rss_bytes"] - baseline)
    if "stopped" in run:
        result["stopped"] = run["stopped"]
        result["bytes_written_when_stopped"] = sum(f.stat().st_size for f in (root / "peft").glob("*"))
    shutil.rmtree(root / "peft", ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/work/bigtmp/scale8b")
    parser.add_argument("--keep-base", action="store_true", help="keep base/, adapter/ and inputs.json")
    parser.add_argument("--reuse", action="store_true", help="reuse the inputs a --keep-base run left")
    parser.add_argument("--layers", type=int, default=32, help="fewer for a quick check of the script")
    args = parser.parse_args()
    root = Path(args.workdir)
    if shutil.disk_usage(root.parent).free < 40 * GB:
        raise SystemExit(f"{root.parent}: needs 40 GB free (base 16 GB + one 16 GB output at a time)")
    if not args.reuse:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine()}
    try:
        saved = root / "inputs.json"
        if args.reuse and saved.is_file():
            inputs = json.loads(saved.read_text())
        else:
            inputs = write_inputs(root, args.layers)
            saved.write_text(json.dumps(inputs))
        results["inputs"] = inputs
        print(json.dumps(inputs), flush=True)
        results["disk"] = disk = disk_rates(root)
        print(json.dumps(disk), flush=True)
        baseline = results["baseline_rss_bytes"] = import_baseline_rss()
        size, largest = inputs["checkpoint_bytes"], inputs["largest_tensor_bytes"]
        bound = 2 * largest + 64 * 2**20
        run = lorakit(["merge", "--model", str(root / "base"), "--adapter", str(root / "adapter"),
                       "-o", str(root / "merged"), "--max-shard-size", "5GB"])
        report = json.loads((root / "merged" / "merge_report.json").read_text())
        merge_only = report["seconds"] - report["verify_seconds"]
        floor = size / disk["read_Bps"] + size / disk["write_Bps"]
        probe_floor = size / disk["probe_read_Bps"] + size / disk["write_Bps"]
        results["merge"] = {
            "seconds": run["seconds"], "report_seconds": report["seconds"],
            "verify_seconds": report["verify_seconds"], "merge_seconds": merge_only,
            "read_plus_write_floor_seconds": floor, "ratio_to_floor": merge_only / floor,
            "probe_floor_seconds": probe_floor, "ratio_to_probe_floor": merge_only / probe_floor,
            "copy_floor_seconds": size / disk["copy_Bps"],
            "ratio_to_copy": merge_only / (size / disk["copy_Bps"]),
            "GBps_written": size / merge_only / GB, "peak_rss_bytes": run["peak_rss_bytes"],
            "above_baseline_bytes": run["peak_rss_bytes"] - baseline, "bound_bytes": bound,
            "within_bound": run["peak_rss_bytes"] - baseline <= bound, "report_memory": report["memory"],
            "verified": report["verification"]["passed"], "verification": report["verification"],
        }
        print(json.dumps(results["merge"]), flush=True)
        shutil.rmtree(root / "merged")
        run = lorakit(["export", "--model", str(llama3_view(root)), "--adapter", str(root / "adapter"),
                       "-o", str(root / "model.gguf"), "--type", "f16"])
        gguf_bytes = (root / "model.gguf").stat().st_size
        results["export"] = {"seconds": run["seconds"], "gguf_bytes": gguf_bytes,
                             "ratio_to_floor": run["seconds"] / (size / disk["read_Bps"]
                                                                 + gguf_bytes / disk["write_Bps"]),
                             "peak_rss_bytes": run["peak_rss_bytes"],
                             "above_baseline_bytes": run["peak_rss_bytes"] - baseline, "bound_bytes": bound,
                             "within_bound": run["peak_rss_bytes"] - baseline <= bound}
        print(json.dumps(results["export"]), flush=True)
        (root / "model.gguf").unlink()
        results["peft"] = peft_merge(root, baseline)
        print(json.dumps(results["peft"]), flush=True)
    finally:
        save_results("scale_8b" if args.layers == 32 else f"scale_8b_{args.layers}_layers", results)
        for path in root.iterdir() if root.exists() else ():
            if path.name not in ("base", "adapter", "inputs.json") or not args.keep_base:
                shutil.rmtree(path) if path.is_dir() else path.unlink()


if __name__ == "__main__":
    main()
