"""Distributed lorakit runs for the tests: `tests/dist_train.py` on 2 CPU processes under torchrun (gloo).

Each run writes its options to OUT/config.yaml with the output directory OUT/run; every process then saves
its own final trainable tensors, whole, to OUT/rank{N}.safetensors (see dist_train.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

LAUNCHER = Path(__file__).with_name("dist_train.py")
# One thread per process: the two processes share the machine's cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ONE_NODE = ("--standalone", "--nproc_per_node", "2")


def start(command: str, options: dict, out: Path, launch: tuple[str, ...] = ONE_NODE,
          **popen: object) -> tuple[subprocess.Popen, Path]:
    """Start one torchrun launch of `command` (train/dpo) with `options`; the process and its config file
    (written once: a second launch into the same `out` reuses it)."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    if not config.is_file():
        config.write_text(yaml.safe_dump({**options, "output": str(out / "run")}))
    argv = [sys.executable, "-m", "torch.distributed.run", *launch, str(LAUNCHER), command, str(config)]
    process = subprocess.Popen([*argv, str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=ENV, **popen)
    return process, config


def torchrun(command: str, options: dict, out: Path, *, nodes: int = 1, timeout: int = 600) -> list[dict]:
    """Run `command` on 2 processes with `options` (output: out/"run"); the final trainable tensors of each
    rank. With nodes=2: two torchrun launches of one process each, meeting at a local c10d rendezvous, as
    two machines would."""
    (out / "config.yaml").unlink(missing_ok=True)
    if nodes == 1:
        launches = [ONE_NODE]
    else:
        port = _free_port()
        launches = [("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--rdzv-backend",
                     "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "lorakit-test")
                    for rank in range(2)]
    processes = [start(command, options, out, launch)[0] for launch in launches]
    for process in processes:
        output, _ = process.communicate(timeout=timeout)
        ranks = [line for line in output.splitlines() if line.startswith("[rank")]  # the workers' tracebacks
        assert process.returncode == 0, "\n".join(ranks[-30:]) or output[-4000:]
    return [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]
