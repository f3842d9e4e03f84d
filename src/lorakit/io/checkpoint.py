"""Local safetensors checkpoints, read and written one tensor at a time.

Reading (`TensorReader`) copies one tensor's byte range (or a block of its rows) out of the file with
`os.preadv`: no memory map, whose touched pages would stay resident until it is closed and so grow with
the shard. Resident memory is what the caller holds: one tensor, whatever the shard size.

Writing (`ShardedWriter`) needs no more than the tensor in hand: the output layout (names, dtypes,
shapes, hence every byte offset) is known before the first tensor is computed, so each shard's header is
written first and tensors are appended as they come. safetensors' own `save_file` would need a whole
shard in memory. The format is its documented one: an 8-byte little-endian header length, a JSON header
(padded with spaces to a multiple of 8) and the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from lorakit.errors import AdapterFileError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lives, and its dtype and shape."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory's tensors, in storage order (file by file, by offset within a file)."""

    directory: Path
    tensors: dict[str, TensorInfo]

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())


def parse_size(size: int | str) -> int:
    """Bytes from "2GB", "500MB", "1GiB" or a plain number (transformers' max_shard_size units)."""
    from transformers.utils.hub import convert_file_size_to_int

    text = str(size).strip()
    try:
        value = int(text) if text.isdigit() else convert_file_size_to_int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"max shard size {size!r}: expected a positive size such as 2GB, 500MB or 1GiB")
    return value


def open_checkpoint(directory: str | Path) -> Checkpoint:
    """List the tensors of a single-file or sharded safetensors checkpoint, validating every file.

    Raises AdapterFileError naming the missing or unreadable file (a shard named by the index included).
    """
    directory = Path(directory)
    index_file = directory / SAFE_WEIGHTS_INDEX_NAME
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise AdapterFileError(f"{index_file}: not a safetensors index (expected a JSON object with a "
                                   f"weight_map; {err})") from None
        files = sorted(set(weight_map.values()))
    elif (directory / SAFE_WEIGHTS_NAME).is_file():
        weight_map, files = None, [SAFE_WEIGHTS_NAME]
    elif any((directory / name).is_file() for name in PICKLE_WEIGHTS):
        raise AdapterFileError(f"{directory}: only pickled pytorch_model.bin weights; re-save the model with "
                               "safetensors (model.save_pretrained) before merging")
    else:
        raise AdapterFileError(f"{directory}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} found")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        path = directory / file
        if not path.is_file():
            raise AdapterFileError(f"{path}: shard named in {SAFE_WEIGHTS_INDEX_NAME} is missing")
        for info in file_tensors(path):
            if weight_map is not None and weight_map.get(info.name) != file:
                raise AdapterFileError(f"{path}: holds tensor {info.name!r}, which {SAFE_WEIGHTS_INDEX_NAME} "
                                       "does not place there")
            tensors[info.name] = info
    missing = sorted(set(weight_map or ()) - set(tensors))
    if missing:
        raise AdapterFileError(f"{directory / weight_map[missing[0]]}: lacks tensor {missing[0]!r} named in "
                               f"{SAFE_WEIGHTS_INDEX_NAME}")
    return Checkpoint(directory, tensors)


def file_tensors(path: Path) -> list[TensorInfo]:
    """The tensors of one safetensors file, by offset; safetensors checks that the data covers the header."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            infos = []
            for name in handle.offset_keys():
                view = handle.get_slice(name)
                dtype = DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise AdapterFileError(f"{path}: tensor {name!r} has dtype {view.get_dtype()}, which "
                                           "lorakit cannot merge")
                infos.append(TensorInfo(name, path.name, dtype, tuple(view.get_shape())))
            return infos
    except SafetensorError as err:
        raise AdapterFileError(f"{path}: not a readable safetensors file (truncated or corrupt? "
                               f"{err})") from None


class TensorReader:
    """Reads tensors from the safetensors files of one directory with `os.preadv`, one tensor (or one block
    of rows) at a time, into memory the returned tensor owns.

    Nothing is memory-mapped, so resident memory is the tensors the caller holds and no more, however large
    the shards; the page cache the reads fill is dropped behind them (`posix_fadvise(DONTNEED)`), so a
    checkpoint larger than RAM streams through without evicting everything else. Use as a context manager.

    reuse=True: every read lands in one buffer the reader owns (grown to the largest read), so a returned
    tensor is valid only until the next read. For loops that are done with each tensor before reading the
    next (the streaming merge, export and verification): it spares the kernel mapping and zeroing fresh
    pages for every tensor, which is most of a read's cost when the data comes from the page cache.
    """

    def __init__(self, directory: str | Path, *, reuse: bool = False) -> None:
        self.directory = Path(directory)
        self._files: dict[str, tuple[int, dict[str, _Entry]]] = {}
        self._reuse = reuse
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def get(self, file: str, name: str) -> Tensor:
        """The whole tensor `name` of `file`."""
        entry = self._entry(file, name)
        return self._read(file, entry, 0, entry.shape[0] if entry.shape else 1)

    def rows(self, file: str, name: str, start: int, stop: int) -> Tensor:
        """Rows start:stop (dim 0) of tensor `name` of `file`, read alone."""
        entry = self._entry(file, name)
        if not entry.shape:
            return self._read(file, entry, 0, 1)
        stop = min(stop, entry.shape[0])
        return self._read(file, entry, min(start, stop), stop)

    def _entry(self, file: str, name: str) -> _Entry:
        if file not in self._files:
            path = self.directory / file
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as err:
                raise AdapterFileError(f"{path}: not a readable safetensors file ({err})") from None
            try:
                self._files[file] = (fd, _read_header(fd, path))
            except BaseException:
                os.close(fd)
                raise
        entry = self._files[file][1].get(name)
        if entry is None:
            raise AdapterFileError(f"{self.directory / file}: has no tensor {name!r}")
        return entry

    def _read(self, file: str, entry: _Entry, start: int, stop: int) -> Tensor:
        fd = self._files[file][0]
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape and entry.shape[0] else entry.nbytes
        offset, size = entry.offset + start * row_bytes, (stop - start) * row_bytes
        data = self._space(size)
        view = memoryview(data.numpy())
        done = 0
        while done < size:
            # Linux reads at most ~2 GiB per call: loop over bounded pieces.
            got = os.preadv(fd, [view[done:done + _READ_CHUNK]], offset + done)
            if got <= 0:
                raise AdapterFileError(f"{self.directory / file}: ends inside tensor {entry.name!r} "
                                       "(truncated?)")
            done += got
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
        shape = ((stop - start), *entry.shape[1:]) if entry.shape else ()
        return data.view(entry.dtype).reshape(shape)

    def _space(self, size: int) -> Tensor:
        if not self._reuse:
            return torch.empty(size, dtype=torch.uint8)
        if self._buffer.numel() < size:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # let the old one go before the larger one comes
            self._buffer = torch.empty(size, dtype=torch.uint8)
        return self._buffer[:size]

    def close(self) -> None:
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_READ_CHUNK = 2**30


@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors header: absolute byte offset in the file, dtype and shape."""

    name: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_header(fd: int, path: Path) -> dict[str, _Entry]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) and check every tensor's byte
    range against its dtype, its shape and the file size."""
    size = os.fstat(fd).st_size
    prefix = os.pread(fd, 8, 0)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if not 0 < length <= size - 8:
        raise AdapterFileError(f"{path}: not a safetensors file (bad header length)")
    try:
        header = json.loads(os.pread(fd, length, 8))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path}: not a safetensors file (header is not JSON: {err})") from None
    entries = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in spec["data_offsets"])
            shape = tuple(int(d) for d in spec["shape"])
            entry = _Entry(name, 8 + length + begin, DTYPES[spec["dtype"]], shape)
        except (KeyError, TypeError, ValueError):
            raise AdapterFileError(f"{path}: tensor {name!r} has an unreadable header entry "
                                   f"{spec!r}") from None
        if end - begin != entry.nbytes or entry.offset + entry.nbytes > size:
            raise AdapterFileError(f"{path}: tensor {name!r}: its byte range [{begin}, {end}) does not hold "
                                   f"{entry.dtype} {entry.shape} within the file (truncated?)")
        entries[name] = entry
    return entries


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def shard_layout(tensors: Iterable[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Split tensors, in order, into shards of at most `max_shard_size` bytes (a larger tensor gets its
    own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """transformers' file names: model.safetensors, or model-00001-of-0000N.safetensors."""
    if count == 1:
        return [SAFE_WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedWriter:
    """Writes the planned shards tensor by tensor, in the planned order; `close` writes the index.

    Every shard's header goes first (offsets precomputed from the layout), then its tensors as they come,
    block by block; each shard is fsynced as it fills. Memory holds at most the block being written.
    """

    def __init__(self, directory: str | Path, layout: list[list[OutputTensor]]) -> None:
        self.directory = Path(directory)
        self.layout = [shard for shard in layout if shard]
        self.files = shard_names(len(self.layout))
        self._pending = [(i, tensor) for i, shard in enumerate(self.layout) for tensor in shard]
        self._next = 0
        self._shard = -1
        self._fh: BinaryIO | None = None

    def write(self, name: str, tensor: Tensor | Iterable[Tensor]) -> None:
        """Append the next planned tensor, given whole or as consecutive blocks of rows (dim 0)."""
        if self._next >= len(self._pending):
            raise RuntimeError(f"ShardedWriter: tensor {name!r} is not in the planned layout")
        shard, planned = self._pending[self._next]
        if name != planned.name:
            raise RuntimeError(f"ShardedWriter: expected tensor {planned.name!r} next, got {name!r}")
        if shard != self._shard:
            self._finish_shard()
            self._start_shard(shard)
        assert self._fh is not None
        rows = 0
        for block in [tensor] if isinstance(tensor, Tensor) else tensor:
            shape = tuple(block.shape)
            if block.dtype != planned.dtype or (shape[1:] if planned.shape else shape) != planned.shape[1:]:
                raise RuntimeError(f"ShardedWriter: {name}: got {block.dtype} {shape}, "
                                   f"planned {planned.dtype} {planned.shape}")
            data = block.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            self._fh.write(memoryview(data.numpy()))
            rows += shape[0] if shape else 1
        if rows != (planned.shape[0] if planned.shape else 1):
            raise RuntimeError(f"ShardedWriter: {name}: wrote {rows} rows of the planned {planned.shape}")
        self._next += 1

    def _start_shard(self, shard: int) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in self.layout[shard]:
            header[tensor.name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        self._fh = open(self.directory / self.files[shard], "wb")  # closed in _finish_shard or abort
        self._fh.write(len(encoded).to_bytes(8, "little"))
        self._fh.write(encoded)
        self._shard = shard

    def _finish_shard(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            if hasattr(os, "posix_fadvise"):
                # Written and synced: drop its pages from the cache rather than push others' out.
                os.posix_fadvise(self._fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            self._fh.close()
            self._fh = None

    def close(self) -> list[str]:
        """Finish the last shard and write the index (when sharded); returns the file names written."""
        self._finish_shard()
        if self._next != len(self._pending):
            unwritten = len(self._pending) - self._next
            raise RuntimeError(f"ShardedWriter: {unwritten} planned tensor(s) were never written")
        if len(self.files) == 1:
            return list(self.files)
        weight_map = {tensor.name: self.files[i] for i, tensor in self._pending}
        index = {
            "metadata": {"total_size": sum(t.nbytes for _, t in self._pending),
                         "total_parameters": sum(math.prod(t.shape) for _, t in self._pending)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        text = json.dumps(index, indent=2) + "\n"
        (self.directory / SAFE_WEIGHTS_INDEX_NAME).write_text(text, encoding="utf-8")
        return [*self.files, SAFE_WEIGHTS_INDEX_NAME]

    def abort(self) -> None:
        """Close an unfinished shard (the caller discards the directory)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
