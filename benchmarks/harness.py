"""Shared pieces of the side-by-side benchmarks: alternating timing, medians and per-pair ratios, tables.

Timings alternate between the contenders (A B A B ...) so that drifts of the machine (other load,
thermal state, caches) hit both alike; the reported ratio is the median of the per-pair ratios.
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def alternate(
    contenders: dict[str, Callable[[], None]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run each contender once per round, in turn; return seconds per call for each."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for index in range(warmup + rounds):
        for name, run in contenders.items():
            gc.collect()
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if index >= warmup:
                times[name].append(elapsed)
    return times


def compare(times: dict[str, list[float]], ours: str = "lorakit", theirs: str = "peft") -> dict[str, float]:
    """Medians of both and the median of per-round ratios ours/theirs (lower is faster for ours)."""
    pairs = [a / b for a, b in zip(times[ours], times[theirs])]
    return {
        f"{ours}_median_s": statistics.median(times[ours]),
        f"{theirs}_median_s": statistics.median(times[theirs]),
        "ratio_median": statistics.median(pairs),
        "ratio_min": min(pairs),
        "ratio_max": max(pairs),
        "rounds": len(pairs),
    }


def matmul_peak_flops(n: int = 1536, repeats: int = 8) -> float:
    """The machine's achieved float32 matmul rate (FLOP/s) on a square torch.mm: the practical limit."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def run_child(argv: Sequence[str]) -> dict[str, Any]:
    """Run `python argv...` in a fresh process (so peak RSS is its own) and parse the JSON line it prints
    last."""
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def own_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A GitHub table; columns are (key, header); floats get 3 significant decimals."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return "–" if value is None else str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def save_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def machine() -> dict[str, Any]:
    import platform

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }




def run_measured(argv: Sequence[str], env: dict[str, str] | None = None,
                 min_available_bytes: int = 0) -> dict[str, Any]:
    """Run `argv` as a fresh process: its wall seconds, its peak RSS in bytes and its stdout; raises with
    the tail of stderr when it fails.

    The peak is the child's VmHWM read from /proc/<pid>/status every 50 ms until it exits (VmHWM only
    grows, so only a peak reached in the last 50 ms could be missed). Not wait4's ru_maxrss: Linux keeps
    in it the high-water mark of the memory the child had before exec, i.e. this process's RSS at fork,
    so it never reads below the parent's RSS.

    If the machine's MemAvailable falls under `min_available_bytes`, the child is killed before the
    OOM killer picks a victim, and the result says so under "stopped" instead of raising."""
    import os
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(list(argv), stdout=out, stderr=err, env={**os.environ, **(env or {})})
        peak, stopped = 0, None
        while process.poll() is None:
            peak = max(peak, _hwm(process.pid))
            if stopped is None and mem_available() < min_available_bytes:
                stopped = f"killed when MemAvailable fell under {min_available_bytes / 1e9:.1f} GB"
                process.kill()
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if stopped:
        return {"seconds": seconds, "peak_rss_bytes": peak, "stopped": stopped}
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}):\n{stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss_bytes": peak, "stdout": stdout}


def mem_available() -> int:
    """The machine's MemAvailable in bytes (/proc/meminfo)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**62


def _hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def import_baseline_rss() -> int:
    """Peak RSS in bytes of a fresh `python -c "import torch, transformers"` (its own VmHWM, printed by
    itself): what every job pays first."""
    code = ("import torch, transformers\n"
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    return int(run_measured([sys.executable, "-c", code])["stdout"].split()[-1]) * 1024
