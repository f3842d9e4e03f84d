"""Peak resident memory of a streaming job (merge, export) against its stated bound.

Streaming a checkpoint holds one input tensor and one output tensor (or block of rows) at a time, plus
float32 temporaries of at most a few 16 MB row blocks and the code it imports, so

    peak RSS − RSS at the start  ≤  2 × largest tensor + 64 MB,

whatever the shard size and the model size (a 16 GB model with a 1 GB embedding needs ~2.1 GB). The
measured side uses the kernel's high-water mark (VmHWM), reset at the start where Linux allows it
(writing 5 to /proc/self/clear_refs); elsewhere it is the process's lifetime peak, an overestimate.
"""

from __future__ import annotations

import os
import pickle
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

OVERHEAD_BYTES = 64 * 2**20


@dataclass(frozen=True)
class MemoryBound:
    """Predicted and measured peak resident memory above the RSS at the start of the job, in bytes."""

    largest_tensor_bytes: int
    predicted_peak_above_start_bytes: int
    measured_peak_above_start_bytes: int
    start_rss_bytes: int
    peak_rss_bytes: int
    within_bound: bool

    def summary(self) -> str:
        """One line for a report table, e.g. "1,410 MiB RSS; 1,155 MiB above the start (bound …)"."""
        peak, above = self.peak_rss_bytes / 2**20, self.measured_peak_above_start_bytes / 2**20
        return (f"{peak:,.0f} MiB RSS; {above:,.0f} MiB above the start (bound "
                f"{self.predicted_peak_above_start_bytes / 2**20:,.0f} MiB: 2 × largest tensor + 64 MiB)")


class PeakMemory:
    """Started at the beginning of a job; `bound` compares its peak with 2 × largest tensor + 64 MB."""

    def __init__(self) -> None:
        _reset_peak()
        self.start = _status("VmRSS") or 0

    def bound(self, largest_tensor_bytes: int) -> MemoryBound:
        peak = _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        predicted = 2 * largest_tensor_bytes + OVERHEAD_BYTES
        measured = max(0, peak - self.start)
        return MemoryBound(largest_tensor_bytes, predicted, measured, self.start, peak, measured <= predicted)


def run_forked(function: Callable[..., T], *args: object) -> T:
    """`function(*args)` computed in a forked child and returned pickled, so that what it imports or
    allocates (transformers' modeling code: ~100 MB for a model built on the meta device) never becomes
    resident in this process. Computed here where fork is unavailable or the child fails."""
    if not hasattr(os, "fork"):
        return function(*args)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, send, exit without running the parent's cleanup
        code = 1
        try:
            os.close(read)
            with os.fdopen(write, "wb") as pipe:
                pipe.write(pickle.dumps(function(*args)))
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        return function(*args)
    return pickle.loads(data)


def _reset_peak() -> None:
    """Start a new peak measurement (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status(field: str) -> int | None:
    """A memory field of /proc/self/status in bytes, or None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
