"""Checking a merged checkpoint: tensor by tensor against the plan, and (optionally) model outputs.

`verify_checkpoint` re-opens what was written, as a reader would, and recomputes every tensor from the
base checkpoint and the adapter files: merged tensors must be within 1 ulp of the target dtype of the
expected round(W + Σ ΔW), every other tensor bit-identical to the base (after the dtype conversion asked
for). It streams like the merge does: one base tensor and one block of written rows at a time, so it
needs no more memory than the merge.

`compare_outputs` loads the base with the adapters unmerged (lorakit's PeftModel) and the merged model,
both computing in float32, and compares their logits on a few prompts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from lorakit.errors import LorakitError
from lorakit.io.checkpoint import TensorReader, open_checkpoint
from lorakit.merge.plan import MergePlan, merged_blocks, target_dtype

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"",
    "Once upon a time, in a small village by the sea, there lived",
)
_MAX_FAILURES = 5
_CHUNK = 2**18  # elements compared at a time (2 MB per float64 temporary)


class VerificationError(LorakitError):
    """The written checkpoint does not hold what the merge should have produced."""


@dataclass(frozen=True)
class TensorCheck:
    tensors_checked: int
    merged_checked: int
    identical_checked: int
    max_abs_error: float
    max_ulp_error: float
    passed: bool
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OutputCheck:
    prompts: int
    tokens: int
    max_logit_diff: float
    argmax_agreement: float
    perplexity_reference: float
    perplexity_merged: float
    perplexity_delta: float


def ulp(values: Tensor, dtype: torch.dtype) -> Tensor:
    """Spacing of `dtype` at each value, in float64: eps · 2^(e−1) for |x| in [2^(e−1), 2^e), where
    eps = 2^(1−p) for p mantissa bits; constant below the smallest normal (subnormal spacing)."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(values.double())
    exponent = exponent.clamp(min=int(math.log2(info.tiny)) + 1)
    return torch.ldexp(torch.full_like(values, info.eps, dtype=torch.float64), exponent - 1)


def verify_checkpoint(directory: str | Path, plan: MergePlan, dtype: torch.dtype | None, *,
                      progress: bool = False) -> TensorCheck:
    """Compare every tensor written in `directory` with what `plan` says it must be."""
    from tqdm.auto import tqdm

    written = open_checkpoint(directory)
    outputs = list(plan.outputs())
    failures: list[str] = []
    missing = [name for name, _ in outputs if name not in written.tensors]
    extra = sorted(set(written.tensors) - {name for name, _ in outputs})
    failures += [f"{name}: missing from the output" for name in missing[:_MAX_FAILURES]]
    failures += [f"{name}: in the output but not planned" for name in extra[:_MAX_FAILURES]]
    merged = identical = 0
    max_abs = max_ulps = 0.0
    with TensorReader(plan.checkpoint.directory, reuse=True) as base_reader, \
            TensorReader(directory, reuse=True) as out_reader:
        for name, info in tqdm(outputs, desc="verifying", unit="tensor", disable=not progress):
            out_info = written.tensors.get(name)
            target = target_dtype(info.dtype, dtype)
            if out_info is None:
                continue
            if (out_info.dtype, out_info.shape) != (target, info.shape):
                failures.append(f"{name}: written as {out_info.dtype} {out_info.shape}, expected {target} "
                                f"{info.shape}")
                continue
            tensor_plan = plan.tensors.get(name)
            exact = tensor_plan is None or not tensor_plan.merged
            blocks = merged_blocks(base_reader.get(info.file, info.name), tensor_plan, plan.adapters, target)
            written_rows = partial(out_reader.rows, out_info.file, name)
            problem, error, ulps = _compare(written_rows, blocks, exact, target)
            identical, merged = identical + exact, merged + (not exact)
            max_abs, max_ulps = max(max_abs, error), max(max_ulps, ulps)
            if problem == "differs":
                source = "saved" if tensor_plan else "base"
                failures.append(f"{name}: differs from the {source} tensor (expected bit-identical)")
            elif problem == "nonfinite":
                failures.append(f"{name}: the merge gives NaN/inf values; the adapter seems broken")
            elif not ulps <= 1.0:
                failures.append(f"{name}: off by {ulps:.3g} ulp of {target} (max abs error {error:.3g})")
    return TensorCheck(len(outputs), merged, identical, max_abs, max_ulps, not failures,
                       failures[:_MAX_FAILURES])


def _compare(written_rows: Callable[[int, int], Tensor], blocks: Iterator[Tensor], exact: bool,
             dtype: torch.dtype) -> tuple[str | None, float, float]:
    """Compare a written tensor, read block by block with `written_rows(start, stop)`, with its expected
    blocks of rows: ("differs"/"nonfinite"/None, max abs error, max error in ulps of `dtype`); float64
    temporaries are bounded by `_CHUNK` elements."""
    start, worst_abs, worst_ulps = 0, 0.0, 0.0
    for block in blocks:
        rows = block.shape[0] if block.dim() else 1
        part = written_rows(start, start + rows)
        part = part.reshape(()) if not block.dim() else part
        start += rows
        if exact:
            if not torch.equal(_bytes(part), _bytes(block)):
                return "differs", worst_abs, worst_ulps
            continue
        if not torch.isfinite(block).all():
            return "nonfinite", worst_abs, worst_ulps
        flat_out, flat_expected = part.reshape(-1), block.reshape(-1)
        for i in range(0, flat_out.numel(), _CHUNK):
            o, e = flat_out[i:i + _CHUNK].double(), flat_expected[i:i + _CHUNK].double()
            error = (o - e).abs()
            worst_abs = max(worst_abs, float(error.max()))
            worst_ulps = max(worst_ulps, float((error / ulp(e, dtype)).max()))
    return None, worst_abs, worst_ulps


def _bytes(tensor: Tensor) -> Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def compare_outputs(base_dir: Path, adapter_dirs: Sequence[Path], weights: Sequence[float], merged_dir: Path,
                    prompts: Sequence[str] = PROMPTS) -> OutputCheck:
    """Logits of the merged model against base + adapters unmerged, on `prompts` (float32 both).

    Several adapters run together, each scaled by its weight; with DoRA that differs from merging them
    one after the other (each DoRA norm then sees the earlier updates), so expect a larger difference.
    """
    from transformers import AutoModelForCausalLM

    reference = _reference_model(base_dir, adapter_dirs, weights)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    max_diff, agree, tokens, nll_ref, nll_merged = 0.0, 0, 0, 0.0, 0.0
    with torch.no_grad():
        for ids in _prompt_ids(merged_dir, merged.config.vocab_size, prompts):
            ref = reference(input_ids=ids).logits.float()
            out = merged(input_ids=ids).logits.float()
            max_diff = max(max_diff, float((ref - out).abs().max()))
            agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
            tokens += ids.shape[1]
            nll_ref += _nll(ref, ids)
            nll_merged += _nll(out, ids)
    predicted = max(tokens - len(prompts), 1)
    ppl_ref, ppl_merged = math.exp(nll_ref / predicted), math.exp(nll_merged / predicted)
    return OutputCheck(len(prompts), tokens, max_diff, agree / tokens, ppl_ref, ppl_merged,
                       ppl_merged - ppl_ref)


def _nll(logits: Tensor, ids: Tensor) -> float:
    """Summed next-token negative log-likelihood of `ids` (teacher forcing)."""
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))


def _reference_model(base_dir: Path, adapter_dirs: Sequence[Path],
                     weights: Sequence[float]) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from lorakit.inject import adapter_modules
    from lorakit.layers import LoraLayer
    from lorakit.model import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    names = [f"adapter_{i}" for i in range(len(adapter_dirs))]
    model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0])
    for name, directory in zip(names[1:], adapter_dirs[1:]):
        model.load_adapter(directory, adapter_name=name)
    # Run every adapter at once, each update scaled by its merge weight (PeftModel's API activates one
    # adapter at a time, so set the state of the adapter modules through their own interface).
    for _, module in adapter_modules(model.get_base_model()):
        if isinstance(module, LoraLayer):
            for name, weight in zip(names, weights):
                if name in module.scaling:
                    module.scaling[name] *= weight
        module.set_active(names)
    return model.eval()


def _prompt_ids(model_dir: Path, vocab_size: int, prompts: Sequence[str]) -> list[Tensor]:
    """Token ids of each prompt with the model's tokenizer, or seeded random ids where it has none."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = [tokenizer(p, return_tensors="pt").input_ids for p in prompts]
        if all(t.shape[1] >= 2 and int(t.max()) < vocab_size for t in ids):
            return ids
    except Exception:  # noqa: BLE001 - no usable tokenizer: random tokens still compare the two models
        pass
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, 8 + 4 * i), generator=generator) for i in range(len(prompts))]
