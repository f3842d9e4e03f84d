"""Writing a GGUF file tensor by tensor, atomically, with the `gguf` package's writer.

A GGUF file is a header, metadata, the table of every tensor's name/shape/type/offset, then the tensor
data. The table needs only shapes and types, so it is written before any weight is computed (the plan);
each tensor is then computed, encoded and appended in table order, and dropped. A tensor whose rows keep
their order is written block of rows by block of rows (`StreamedRows`), so memory holds one input tensor
and one encoded block, as `lorakit merge` does (≤ 2 × largest tensor + 64 MB above the start,
`lorakit.io.memory`); one whose rows are reordered (q/k for llama.cpp's rotary layout) is assembled whole.

The file is written under a temporary name beside the output and renamed into place at the end, so an
interrupted or failed export leaves no file that looks complete, and an existing file stays untouched.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lorakit.export.tensor_types import stored_shape, type_name
from lorakit.io.atomic import atomic_file
from lorakit.io.memory import MemoryBound


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the output file: GGUF name, logical shape (PyTorch order) and stored type."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType

    @property
    def array_shape(self) -> tuple[int, ...]:
        return stored_shape(self.shape, self.qtype)[0]

    @property
    def nbytes(self) -> int:
        shape, dtype = stored_shape(self.shape, self.qtype)
        return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


class StreamedRows:
    """A tensor's encoded data as consecutive blocks of rows, written to the file as they come.

    It stands in for the whole array in `gguf.GGUFWriter.write_tensor_data`, which reads `nbytes` and
    calls `tofile` (and `byteswap`, only for a big-endian file, which lorakit never writes).
    """

    def __init__(self, name: str, shape: tuple[int, ...], dtype: np.dtype, blocks: Iterable[np.ndarray]):
        self.name, self.shape, self.dtype, self._blocks = name, shape, np.dtype(dtype), blocks
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize

    def tofile(self, file: Any) -> None:
        written = 0
        for block in self._blocks:
            block = np.ascontiguousarray(block)
            block.tofile(file)
            written += block.nbytes
        if written != self.nbytes:
            raise RuntimeError(f"{self.name}: produced {written} bytes of the planned {self.nbytes} "
                               f"({self.dtype} {self.shape})")


@dataclass(frozen=True)
class ExportReport:
    """What an export did: `kind` is "model" (merged weights) or "adapter" (a GGUF LoRA adapter)."""

    kind: str
    base: str
    adapters: list[str]
    weights: list[float]
    output: str
    architecture: str
    type: str
    tensors: int
    types: dict[str, int]
    total_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    memory: MemoryBound | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def gguf_output(path: Path, architecture: str, overwrite: bool) -> Iterator[gguf.GGUFWriter]:
    """A GGUF writer on a temporary file that becomes `path` when the block finishes without error."""
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; give a .gguf file path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; pass --overwrite (overwrite=True) to replace it")
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture)
        try:
            yield writer
        finally:
            writer.close()


def write_tensors(writer: gguf.GGUFWriter, plan: Sequence[PlannedTensor],
                  produce: Callable[[PlannedTensor], np.ndarray | StreamedRows], progress: bool) -> None:
    """Write metadata and the tensor table, then each tensor as `produce` returns it, in plan order."""
    from tqdm.auto import tqdm

    for tensor in plan:
        shape, dtype = stored_shape(tensor.shape, tensor.qtype)
        plain = tensor.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        raw = None if plain else tensor.qtype
        writer.add_tensor_info(tensor.name, shape, dtype, tensor.nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    bar = tqdm(total=sum(t.nbytes for t in plan), unit="B", unit_scale=True, desc="exporting",
               disable=not progress)
    try:
        for tensor in plan:
            array = produce(tensor)
            if array.shape != tensor.array_shape or array.nbytes != tensor.nbytes:
                raise RuntimeError(f"{tensor.name}: produced {array.dtype} {array.shape}, "
                                   f"planned {tensor.array_shape}")
            writer.write_tensor_data(array)
            bar.update(tensor.nbytes)
    finally:
        bar.close()


def file_type_counts(plan: Sequence[PlannedTensor]) -> dict[str, int]:
    """How many tensors of each type, e.g. {"q8_0": 210, "f32": 61}."""
    return dict(Counter(type_name(t.qtype) for t in plan).most_common())


def report(kind: str, base: Path, adapters: Sequence[Path], weights: Sequence[float], output: Path,
           architecture: str, requested: str, plan: Sequence[PlannedTensor], start: float,
           notes: Sequence[str] = (), memory: MemoryBound | None = None) -> ExportReport:
    return ExportReport(
        kind=kind, base=str(base), adapters=[str(a) for a in adapters], weights=list(weights),
        output=str(output), architecture=architecture, type=requested, tensors=len(plan),
        types=file_type_counts(plan),
        total_bytes=output.stat().st_size, seconds=round(time.perf_counter() - start, 3), notes=list(notes),
        memory=memory,
    )
