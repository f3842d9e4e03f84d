"""Optional `torch.compile` of the decoder layers for the training loop (`--compile`).

Each decoder layer (the classes a transformers model lists in `_no_split_modules`) is compiled in place with
`nn.Module.compile`, so parameter names, saving and the model object stay as they are; the LoRA layers
inside trace without graph breaks, so one graph per layer type fuses the elementwise work around the matmuls
(RMSNorm, rotary embeddings, SiLU, residual adds) in the forward and the backward. The head, the loss and
the optimizer stay eager. On this project's 2-core CPU it cut the SmolLM2-135M training step on random
tokens to 0.79–0.89 of eager after a ~15 s compile, and left steps with prefix sharing (chat rows, which run
the layers against a KV cache) unchanged (benchmarks/bench_train_step.py); numbers equal eager's within
float32 reassociation (tests/test_compile.py).

Compiled only inside the block: evaluation and generation afterwards run eagerly, since decoding shapes
(one new token, a growing cache) would compile further graphs for little gain.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` whose class the model lists as unsplittable (its decoder layers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    # By the class's ancestry: FSDP2 turns a sharded LlamaDecoderLayer into an FSDPLlamaDecoderLayer subclass.
    return [m for m in base.modules() if any(c.__name__ in names for c in type(m).__mro__)]


@contextmanager
def compiled_decoder_layers(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block the decoder layers of `model` run compiled; yields how many were compiled.

    Raises ValueError for a model that names no decoder layer class (nothing to compile).
    """
    if not enabled:
        yield 0
        return
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"--compile: {type(model).__name__} lists no decoder layer class (_no_split_modules); "
            "run without --compile"
        )
    for layer in layers:
        layer.compile()
    try:
        yield len(layers)
    finally:
        for layer in layers:
            # What nn.Module.compile set; without it the layer's calls are eager again.
            layer._compiled_call_impl = None
