"""Pieces several commands share: loading a model with named adapters."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lorakit.errors import LorakitError
from lorakit.io.pretrained import check_adapter_name


def parse_adapter_specs(specs: list[str] | None) -> list[tuple[str, Path]]:
    """`NAME=DIR` or `DIR` (named after the directory) → [(name, path)], names unique."""
    parsed: list[tuple[str, Path]] = []
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            path = name
            name = Path(path).resolve().name if Path(path).name in ("", ".") else Path(path).name
        if not name or not path:
            raise LorakitError(f"--adapter {spec!r}: expected NAME=DIR or DIR")
        check_adapter_name(name)
        if name in {n for n, _ in parsed}:
            raise LorakitError(f"--adapter {spec!r}: the name {name!r} is used twice; give NAME=DIR")
        parsed.append((name, Path(path)))
    return parsed


def load_model_with_adapters(model: str | None, adapters: list[str] | None, *, active: str | None = None,
                             trust_remote_code: bool = False, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer, adapter names): the base with every adapter loaded, `active` (or the first) on,
    on `device` with the base in `dtype` (--device, --dtype: lorakit.device; adapters keep float32 factors).

    With no adapters the plain transformers model is returned. A model that ships its own code loads
    only with `trust_remote_code`.
    """
    from lorakit.device import resolve_device, resolve_dtype
    from lorakit.model import PeftModel
    from lorakit.models.sources import load_causal_lm, load_tokenizer

    specs = parse_adapter_specs(adapters)
    if active is not None and active not in {n for n, _ in specs} | {"base"}:
        loaded = ", ".join(n for n, _ in specs) or "none"
        raise LorakitError(f"--use {active!r}: no adapter of that name; loaded: {loaded}")
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    where = resolve_device(device)
    base = load_causal_lm(model, dtype=resolve_dtype(dtype, where), trust_remote_code=trust_remote_code,
                          attn_implementation="sdpa")
    base.to(where).eval()
    if not specs:
        return base, tokenizer, []
    first_name, first_path = specs[0]
    wrapped: nn.Module = PeftModel.from_pretrained(base, first_path, adapter_name=first_name)
    for name, path in specs[1:]:
        wrapped.load_adapter(path, adapter_name=name)
    if active and active != "base":
        wrapped.set_adapter(active, inference_mode=True)
    wrapped.eval()
    return wrapped, tokenizer, [n for n, _ in specs]
