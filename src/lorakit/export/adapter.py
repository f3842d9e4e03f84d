"""`export_adapter_gguf`: a LoRA adapter as a GGUF LoRA file that llama.cpp's `--lora` loads.

The layout is that of llama.cpp's own converter (convert_lora_to_gguf.py):

    general.type = "adapter", adapter.type = "lora", adapter.lora.alpha = α, general.architecture
    <base tensor>.lora_a   A, (r, in)            e.g. blk.0.attn_q.weight.lora_a
    <base tensor>.lora_b   B, (out, r)
    token_embd.weight.lora_a / .lora_b: Aᵀ (vocab, r) and B (dim, r), as llama.cpp's embedding lookup wants

llama.cpp adds (α / r) · B A with r read from the tensors. lorakit's scaling s can differ from α / r
(rsLoRA's α / √r, per-module alpha_pattern): B is then stored as B · s / (α / r), so llama.cpp computes
exactly s · B A. For the `llama` architecture B's rows (the update's output rows) of q/k projections are
reordered as the base weights are (see `architecture`).

What such a file cannot carry is refused in one line: DoRA, lora_bias, tensors saved whole
(modules_to_save, trained biases, a changed copy of a base tensor) and updates that would untie tied
embeddings; export the merged model for those. Unchanged copies of base tensors (PEFT saves the embedding
beside an embedding adapter) are left out, as llama.cpp's converter does.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from lorakit.errors import AdapterFileError
from lorakit.export.architecture import Architecture, describe
from lorakit.export.tensor_types import encode, parse_type, tensor_type
from lorakit.export.writer import ExportReport, PlannedTensor, gguf_output, report, write_tensors
from lorakit.io.checkpoint import TensorReader, open_checkpoint
from lorakit.merge.adapter_file import AdapterFile, LoraModule, open_adapter
from lorakit.merge.plan import MergePlan, ReplaceOp, build_plan, describe_base

MERGED_HINT = "; export the merged model instead (lorakit export --format gguf without --adapter-only)"


def export_adapter_gguf(
    base: str | os.PathLike | None,
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    *,
    type: str = "f16",
    overwrite: bool = False,
    progress: bool = False,
) -> ExportReport:
    """Write `adapter` (trained on `base`) as a GGUF LoRA adapter for llama.cpp.

    The base is needed for its architecture (names, head counts) and to check that the adapter fits it:
    an adapter for another base gets a one-line error naming the module and shapes.
    """
    start = time.perf_counter()
    requested = parse_type(type)
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: already exists; pass --overwrite (overwrite=True) to replace it")
    from lorakit.models.sources import resolve_model_source

    base_dir = resolve_model_source(base)
    architecture = describe(base_dir)
    with open_adapter(adapter) as opened:
        base_model = describe_base(base_dir, architecture.config)
        plan = build_plan(open_checkpoint(base_dir), base_model, [opened], [1.0])
        modules = _lora_modules(opened, plan.untie_embeddings)
        _check_saved_copies(opened, plan)
        alpha = float(opened.config.lora_alpha)
        tensors = _tensors(opened, modules, architecture, alpha)
        planned = [PlannedTensor(name, tuple(value.shape), tensor_type(tuple(value.shape), requested))
                   for name, value in tensors.items()]
        with gguf_output(output, architecture.name, overwrite) as writer:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_name(output.stem)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)

            def produce(tensor: PlannedTensor) -> np.ndarray:
                return encode(tensors[tensor.name], tensor.qtype)

            write_tensors(writer, planned, produce, progress)
    return report("adapter", base_dir, [opened.directory], [1.0], output, architecture.name, type, planned,
                  start)


def _lora_modules(adapter: AdapterFile, unties: bool) -> list[LoraModule]:
    """The adapter's LoRA modules, refusing what a GGUF LoRA adapter cannot express."""
    modules, saved = adapter.layout()
    if adapter.config.use_dora:
        raise AdapterFileError(f"{adapter.directory}: DoRA adapters have no llama.cpp LoRA form{MERGED_HINT}")
    whole = next((tensor for tensor in saved if tensor.whole_module), None)
    if whole is not None:
        raise AdapterFileError(f"{adapter.file}: saves whole tensors ({whole.key!r}...), which a GGUF LoRA "
                               f"adapter cannot hold{MERGED_HINT}")
    with_bias = next((m for m in modules if m.lora_bias is not None), None)
    if with_bias is not None:
        raise AdapterFileError(f"{adapter.file}: module {with_bias.name!r} has a lora_B.bias (lora_bias), "
                               f"which llama.cpp's LoRA adapters lack{MERGED_HINT}")
    if unties:
        raise AdapterFileError(f"{adapter.directory}: changes the embedding or output projection of a base "
                               f"that ties them; llama.cpp would apply it to both{MERGED_HINT}")
    if not modules:
        raise AdapterFileError(f"{adapter.file}: no LoRA tensors")
    return modules


def _check_saved_copies(adapter: AdapterFile, plan: MergePlan) -> None:
    """Base tensors the adapter carries must equal the base's: a GGUF adapter cannot replace them."""
    with TensorReader(plan.checkpoint.directory) as reader:
        for name, tensor_plan in plan.tensors.items():
            for op in tensor_plan.ops:
                if not isinstance(op, ReplaceOp):
                    continue
                info = plan.checkpoint.tensors[tensor_plan.source]
                base = reader.get(info.file, info.name)
                if not torch.equal(adapter.get(op.key).to(base.dtype), base):
                    raise AdapterFileError(f"{adapter.file}: {op.key!r} differs from the base's {name!r} "
                                           f"(resized or trained), which a GGUF LoRA adapter cannot hold"
                                           f"{MERGED_HINT}")


def _tensors(adapter: AdapterFile, modules: list[LoraModule], architecture: Architecture,
             alpha: float) -> dict[str, torch.Tensor]:
    """GGUF name → float32 tensor, lora_a then lora_b for every module, in the adapter's order."""
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        name = architecture.gguf_name(f"{module.name}.weight")
        if name is None:
            raise AdapterFileError(f"{adapter.file}: module {module.name!r} is not a weight llama.cpp "
                                   "can adapt")
        a = adapter.get(module.lora_A).float()
        b = adapter.get(module.lora_B).float()
        # llama.cpp scales by alpha / r; fold any difference from lorakit's scaling into B.
        scaling = adapter.scaling(module.name)
        b = b * (scaling / (alpha / module.rank) if alpha else scaling)
        if module.embedding:
            a = a.T  # (vocab, r): llama.cpp looks up rows of lora_a for the token ids
        else:
            order = architecture.row_order(name, b.shape[0])
            b = b if order is None else b[order]
        tensors[f"{name}.lora_a"] = a.contiguous()
        tensors[f"{name}.lora_b"] = b.contiguous()
    return tensors
