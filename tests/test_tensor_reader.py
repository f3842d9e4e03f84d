"""`TensorReader`: whole tensors and row ranges read with preadv equal what safetensors loads, with a fresh
buffer per read or (reuse=True) one buffer for all reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.io.checkpoint import TensorReader

TENSORS = {
    "embed": torch.randn(50, 12, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
    "norm": torch.linspace(-1, 1, 12),
    "scale": torch.tensor(3.5, dtype=torch.float16),
    "ids": torch.arange(7, dtype=torch.int64),
    "conv": torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1)),
}


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    save_file(TENSORS, tmp_path / "model.safetensors")
    return tmp_path


@pytest.mark.parametrize("reuse", [False, True])
def test_whole_tensors_and_row_ranges_equal_safetensors(shard: Path, reuse: bool) -> None:
    expected = load_file(shard / "model.safetensors")
    with TensorReader(shard, reuse=reuse) as reader:
        for name, tensor in expected.items():
            got = reader.get("model.safetensors", name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
        for name, start, stop in [("embed", 0, 50), ("embed", 13, 29), ("embed", 45, 80), ("conv", 1, 3),
                                  ("ids", 2, 5)]:
            rows = reader.rows("model.safetensors", name, start, stop)
            assert torch.equal(rows, expected[name][start:stop]), (name, start, stop)


def test_reuse_reads_into_one_buffer(shard: Path) -> None:
    with TensorReader(shard, reuse=True) as reader:
        first = reader.get("model.safetensors", "embed")
        pointer = first.untyped_storage().data_ptr()
        again = [reader.get("model.safetensors", name) for name in ("norm", "ids", "conv", "embed")]
        assert all(t.untyped_storage().data_ptr() == pointer for t in again)
        assert torch.equal(again[-1], TENSORS["embed"])
    with TensorReader(shard) as reader:  # the default: each tensor owns its memory
        first, second = reader.get("model.safetensors", "embed"), reader.get("model.safetensors", "norm")
        assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
        assert torch.equal(first, TENSORS["embed"])
