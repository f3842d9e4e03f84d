"""Test-only launcher: one process of a distributed lorakit training run.

    torchrun --nproc_per_node 2 tests/dist_train.py {train|dpo} CONFIG.yaml OUT_DIR

Every process trains with the options in CONFIG.yaml (the trainer itself saves from the main process
only), then writes its own trainable tensors, whole (gathered from shards under --fsdp), to
OUT_DIR/rank{N}.safetensors, so that a test can check that all processes ended with the same weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from lorakit.cli.main import finish_process
from lorakit.train.config import DPOConfig, TrainConfig
from lorakit.train.dpo import train_dpo
from lorakit.train.sft import train


def main(command: str, config_path: str, out_dir: str) -> None:
    if command == "dpo":
        result = train_dpo(DPOConfig.from_yaml(config_path))
    else:
        result = train(TrainConfig.from_yaml(config_path))
    rank = int(os.environ.get("RANK", "0"))
    tensors = {}
    for name, param in result.model.named_parameters():
        if param.requires_grad:
            whole = param.full_tensor() if hasattr(param, "full_tensor") else param
            tensors[name] = whole.detach().cpu().contiguous()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(out_dir) / f"rank{rank}.safetensors"))
    finish_process(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
