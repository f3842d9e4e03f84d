"""`export_gguf`: a merged model as one GGUF file, streamed from base + adapters (or a merged checkpoint).

Each output tensor is the streaming merge's (`lorakit.merge.plan.merged_blocks`: float32 maths, one
rounding), computed block of rows by block of rows, encoded into its GGUF type, placed at its GGUF row
(q/k rows are reordered for llama.cpp's rotary layout, see `architecture`) and written; then dropped.
With no adapter the base is exported as it is, so `lorakit merge` followed by an export and a direct
export give the same file.

    W_gguf = encode( P · round_t( W + Σᵢ wᵢ sᵢ BᵢAᵢ ) )    P: row order, t: the tensor's GGUF type
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path

import gguf
import numpy as np
import torch

from lorakit.export.architecture import Architecture, describe
from lorakit.export.tensor_types import FLOAT_TYPES, TYPES, encode, parse_type, stored_shape, tensor_type
from lorakit.export.tokenizer import add_tokenizer
from lorakit.export.writer import (
    ExportReport,
    PlannedTensor,
    StreamedRows,
    gguf_output,
    report,
    write_tensors,
)
from lorakit.io.checkpoint import TensorInfo, TensorReader, open_checkpoint
from lorakit.io.memory import PeakMemory
from lorakit.merge.adapter_file import open_adapter
from lorakit.merge.plan import MergePlan, build_plan, describe_base, merged_blocks


def export_gguf(
    base: str | os.PathLike | None,
    output: str | os.PathLike,
    adapters: Sequence[str | os.PathLike] = (),
    *,
    weights: Sequence[float] | None = None,
    type: str = "f16",
    overwrite: bool = False,
    progress: bool = False,
) -> ExportReport:
    """Write base + Σ wᵢ·ΔWᵢ (or the base alone: a merged checkpoint) as a GGUF model file.

    base: a local model directory, a .gguf file or "default"/None (see `lorakit.models.sources`).
    type: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0 for the matrices; vectors stay f32.
    The file carries the hyperparameters and the tokenizer (vocabulary, merges, special tokens, chat
    template) that llama.cpp and transformers' GGUF loader read.
    """
    start = time.perf_counter()
    memory = PeakMemory()
    paths = [Path(p) for p in adapters]
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise ValueError(f"export: {len(paths)} adapter(s) but {len(weights)} weight(s)")
    requested = parse_type(type)
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: already exists; pass --overwrite (overwrite=True) to replace it")
    base_dir = _resolve_base(base)
    architecture = describe(base_dir)
    checkpoint = open_checkpoint(base_dir)
    with ExitStack() as stack:
        opened = [stack.enter_context(open_adapter(path)) for path in paths]
        plan = build_plan(checkpoint, describe_base(base_dir, architecture.config), opened, weights)
        tensors = _plan_tensors(plan, architecture, requested)
        planned = [t for t, _, _ in tensors]
        sources = {t.name: (name, info) for t, name, info in tensors}
        writer = stack.enter_context(gguf_output(output, architecture.name, overwrite))
        reader = stack.enter_context(TensorReader(checkpoint.directory, reuse=True))
        _add_metadata(writer, architecture, output, type)
        add_tokenizer(writer, base_dir, int(architecture.config["vocab_size"]))

        def produce(tensor: PlannedTensor) -> np.ndarray | StreamedRows:
            name, info = sources[tensor.name]
            target = FLOAT_TYPES.get(tensor.qtype, torch.float32)
            stored = reader.get(info.file, info.name)
            blocks = merged_blocks(stored, plan.tensors.get(name), plan.adapters, target)
            return _assemble(blocks, tensor, architecture.row_order(tensor.name, tensor.shape[0]))

        write_tensors(writer, planned, produce, progress)
    largest = max((max(t.nbytes, info.nbytes) for t, _, info in tensors), default=0)
    return report("model", base_dir, [a.directory for a in opened], weights, output, architecture.name, type,
                  planned, start, _notes(plan, architecture, planned, requested), memory.bound(largest))


def _resolve_base(base: str | os.PathLike | None) -> Path:
    # Imported here: model sources pull in the hub client and GGUF conversion, needed only for such bases.
    from lorakit.models.sources import resolve_model_source

    return resolve_model_source(base)


def _plan_tensors(plan: MergePlan, architecture: Architecture,
                  requested: gguf.GGMLQuantizationType) -> list[tuple[PlannedTensor, str, TensorInfo]]:
    """(GGUF tensor, checkpoint name, base tensor it starts from) for every tensor of the file.

    A tied output projection is left out (llama.cpp and transformers then reuse token_embd), unless the
    adapters changed it apart from the embedding.
    """
    tensors = []
    for name, info in plan.outputs():
        gguf_name = architecture.gguf_name(name)
        if gguf_name is None:
            continue
        if gguf_name == "output.weight" and architecture.tied_embeddings and not plan.untie_embeddings:
            continue
        tensors.append((PlannedTensor(gguf_name, info.shape, tensor_type(info.shape, requested)), name, info))
    return tensors


def _assemble(blocks: Iterable[torch.Tensor], tensor: PlannedTensor,
              order: torch.Tensor | None) -> np.ndarray | StreamedRows:
    """Encode consecutive row blocks into the stored data: streamed as they come when the rows keep their
    order; with a row order, stored row i goes to the GGUF row r where order[r] = i, so the tensor is
    assembled first (every GGUF type encodes rows independently, so this commutes)."""
    shape, dtype = stored_shape(tensor.shape, tensor.qtype)
    encoded = (encode(block, tensor.qtype) for block in blocks)
    if order is None:
        return StreamedRows(tensor.name, shape, dtype, encoded)
    out = np.empty(shape, dtype)
    positions = torch.argsort(order).numpy()
    row = 0
    for block in encoded:
        out[positions[row:row + block.shape[0]]] = block
        row += block.shape[0]
    if row != shape[0]:
        raise RuntimeError(f"{tensor.name}: got {row} rows of the planned {tensor.shape}")
    return out


def _add_metadata(writer: gguf.GGUFWriter, architecture: Architecture, output: Path, requested: str) -> None:
    qtype, file_type = TYPES[requested]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(output.stem)
    writer.add_file_type(int(file_type))
    if qtype not in FLOAT_TYPES:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    architecture.add_hyperparameters(writer)


def _notes(plan: MergePlan, architecture: Architecture, planned: list[PlannedTensor],
           requested: gguf.GGMLQuantizationType) -> list[str]:
    notes = []
    names = {t.name for t in planned}
    if architecture.tied_embeddings and "output.weight" not in names:
        notes.append("tied embeddings: no output.weight, token_embd serves both")
    if plan.untie_embeddings:
        notes.append("the adapters change the output projection apart from the embedding: "
                     "output.weight written")
    quantized = requested not in FLOAT_TYPES
    fallback = [t.name for t in planned if quantized and t.qtype == gguf.GGMLQuantizationType.F16]
    if fallback:
        notes.append(f"{len(fallback)} matri{'x' if len(fallback) == 1 else 'ces'} kept in f16: rows are not "
                     f"whole {requested.name.lower()} blocks ({fallback[0]}...)")
    return notes
