"""Tiny random transformers models and helpers shared by the tests: every test builds its models here.

Models are built in code (no downloads) with fixed seeds: hidden size 32, 2 layers, vocab 96 unless a test
asks otherwise (`tiny_model(..., **config)`). Token ids for pad/bos/eos lie inside the vocabulary so
transformers does not warn.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

VOCAB = 96
HIDDEN = 32


class CrashAfter:
    """A training callback (`train(config, callbacks=[CrashAfter(k)])`) that raises RuntimeError("simulated
    crash") as step k + 1 ends: that step's checkpoint is never written, as after a real crash in it."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_record(self, record: dict) -> None:
        if record["kind"] == "train" and record["step"] > self.steps:
            raise RuntimeError("simulated crash")

    def on_end(self, report: dict) -> None:
        """Nothing to do."""


def tiny_model(model_type: str, seed: int = 0, hidden: int = HIDDEN, dtype: torch.dtype = torch.float32, *,
               perturb: bool = True, **config) -> nn.Module:
    """A tiny random model of any architecture transformers knows (`model_type`: "llama", "gpt2", "qwen2",
    ...): hidden size `hidden`, 2 layers, vocab 96, pad/bos/eos 0/1/2, weights drawn after
    `torch.manual_seed(seed)`, in eval mode. `config` overrides the config's fields; `perturb` gives biases
    and norms random offsets, so that bias modes and norms matter numerically (False: transformers' init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**_sizes(model_type, hidden), **config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if perturb:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias") or "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight")):
                    param.add_(0.1 * torch.randn_like(param))
    return model.to(dtype).eval()


def _sizes(model_type: str, hidden: int) -> dict[str, int]:
    tokens = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if model_type == "gpt2":
        return {**tokens, "n_embd": hidden, "n_layer": 2, "n_head": 4, "n_positions": 64}
    return {**tokens, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def tiny_llama(
    seed: int = 0, hidden: int = HIDDEN, dtype: torch.dtype = torch.float32, **kwargs
) -> nn.Module:
    return tiny_model("llama", seed, hidden, dtype, **{"tie_word_embeddings": False, **kwargs})


def tiny_mistral(
    seed: int = 0, hidden: int = HIDDEN, dtype: torch.dtype = torch.float32, **kwargs
) -> nn.Module:
    return tiny_model("mistral", seed, hidden, dtype, **{"tie_word_embeddings": False, "sliding_window": None,
                                                         **kwargs})


def tiny_gpt2(seed: int = 0, hidden: int = HIDDEN, dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    return tiny_model("gpt2", seed, hidden, dtype, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "llama": tiny_llama,
    "mistral": tiny_mistral,
    "gpt2": tiny_gpt2,
}


def make_model(kind: str, seed: int = 0, **kwargs) -> nn.Module:
    return MODELS[kind](seed, **kwargs)


def input_ids(batch: int = 2, length: int = 7, seed: int = 123) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    ids = input_ids() if ids is None else ids
    return model(input_ids=ids, **kwargs).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def perturb_adapter(model: nn.Module, seed: int = 7, scale: float = 0.2, biases: bool = True) -> None:
    """Give every trainable tensor (adapter factors, DoRA magnitudes, trained biases, saved copies) random
    offsets, as training would, so that a saved adapter differs from its init in every tensor."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if not biases and name.endswith("bias") and "lora_" not in name:
            continue
        noise = torch.randn(param.shape, generator=gen).to(param.device, param.dtype)
        param.add_(scale * noise)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence warnings that the oracle (PEFT) or transformers emit for tiny random models."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def peft_config(**kwargs):
    import peft

    return peft.LoraConfig(**kwargs)


def lk_config(**kwargs):
    import lorakit

    return lorakit.LoraConfig(**kwargs)


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def file_keys(directory: Path | str) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(Path(directory) / "adapter_model.safetensors"), "pt") as fh:
        return set(fh.keys())


def file_tensors(directory: Path | str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "adapter_model.safetensors"))
