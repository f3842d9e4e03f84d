"""Test-only launcher: one process of a distributed `lorakit.train.sft.train` run.

    torchrun --nproc_per_node 2 tests/dist_train.py CONFIG.yaml OUT_DIR

Every process trains with the TrainConfig in CONFIG.yaml (the trainer itself saves from the main process
only), then writes its own trainable tensors as it holds them in memory to OUT_DIR/rank{N}.safetensors,
so that a test can check that all processes ended with the same weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from lorakit.train.config import TrainConfig
from lorakit.train.sft import train


def main(config_path: str, out_dir: str) -> None:
    config = TrainConfig.from_yaml(config_path)
    result = train(config)
    rank = int(os.environ.get("RANK", "0"))
    tensors = {name: p.detach().cpu().contiguous() for name, p in result.model.named_parameters() if p.requires_grad}
    save_file(tensors, str(Path(out_dir) / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
