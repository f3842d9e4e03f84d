"""Model sources: everywhere lorakit takes a model (the API and the CLI's `--model`), it accepts

* nothing or `"default"`: the embedded SmolLM2-135M-Instruct (see `lorakit.models.default`);
* a local transformers directory (with a config.json);
* a local `.gguf` file, converted once to a float32 checkpoint in the lorakit cache;
* a Hugging Face hub id (`org/name`), downloaded to the hub's cache, or found there when offline.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorakit.errors import LorakitError
from lorakit.models.default import convert_gguf, default_model_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_SOURCE = "default"
# Long enough for a slow link, short enough that an offline machine answers at once instead of hanging.
HUB_PROBE_TIMEOUT_S = 3.0


def resolve_model_source(source: str | os.PathLike | None) -> Path:
    """The local directory for a model source (see the module docstring); converts or downloads as needed."""
    if source is None or source == DEFAULT_SOURCE:
        return default_model_path()
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LorakitError(f"{text}: no config.json here; expected a transformers model directory")
        # Absolute, so that adapters record a base_model_name_or_path that works from any directory.
        return path.resolve()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return convert_gguf(path)
        raise LorakitError(f"{text}: not a model directory or .gguf file")
    if not isinstance(source, str) or _looks_local(text):
        raise LorakitError(f"{text}: no such model directory or .gguf file")
    return download_snapshot(text)


def _looks_local(text: str) -> bool:
    """Whether a missing source was meant as a local path rather than a hub id (`name` or `org/name`)."""
    # On POSIX os.sep is "/", which hub ids contain too; a second "/" or a leading one rules out an id.
    separators = {os.sep, os.altsep} - {None, "/"}
    return (
        text.startswith((".", "~", "/"))
        or text.count("/") > 1
        or any(separator in text for separator in separators)
        or text.lower().endswith(".gguf")
    )


def download_snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    """Download (or find in the hub cache) a hub repository and return its local snapshot directory.

    Fails within seconds when the hub cannot be reached and nothing is cached, instead of hanging.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    # Offline (or unreachable), ask only the local cache: the hub client would otherwise wait on timeouts.
    local_only = constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=local_only))
    except HFValidationError as error:
        raise LorakitError(f"{repo_id}: no such local path, and not a valid Hugging Face hub id") from error
    except LocalEntryNotFoundError as error:
        raise LorakitError(
            f"{repo_id}: not a local directory or .gguf file, "
            "and the Hugging Face hub is unreachable (offline?)"
        ) from error
    except GatedRepoError as error:
        raise LorakitError(
            f"{repo_id}: gated on the Hugging Face hub; accept its terms there, then `hf auth login`"
        ) from error
    except RepositoryNotFoundError as error:
        raise LorakitError(
            f"{repo_id}: no such repository on the Hugging Face hub (private? `hf auth login`)"
        ) from error
    except HfHubHTTPError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LorakitError(f"{repo_id}: download from the Hugging Face hub failed: {reason}") from error


def _hub_reachable(endpoint: str) -> bool:
    """A quick TCP connect to the hub endpoint, so an offline machine fails fast."""
    proxies = urllib.request.getproxies()
    if any(scheme in proxies for scheme in ("https", "http", "all")):
        return True  # the proxy, not a direct connection, decides: let the hub client try
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def load_causal_lm(source: str | os.PathLike | None = None, *, dtype: torch.dtype | str = torch.float32,
                   trust_remote_code: bool = False, **kwargs: Any) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` on a model source; extra kwargs go to `from_pretrained`.

    Remote code runs only with `trust_remote_code=True`, never implicitly.
    """
    from transformers import AutoModelForCausalLM

    # PEFT-era callers (and AutoPeftModelForCausalLM users) still spell it torch_dtype.
    dtype = kwargs.pop("torch_dtype", dtype)
    directory = resolve_model_source(source)
    refuse_remote_code(directory, trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
    )


def load_tokenizer(source: str | os.PathLike | None = None, *,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained` on a model source, with a pad token guaranteed where possible.

    A missing pad token is set to an existing special token (eos, else unk, else bos); no token is ever
    added, so the vocabulary, and the model's embedding size, stay as they are.
    """
    from transformers import AutoTokenizer

    directory = resolve_model_source(source)
    refuse_remote_code(directory, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        candidates = (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token)
        fallback = next((token for token in candidates if token), None)
        if fallback is not None:
            tokenizer.pad_token = fallback
    return tokenizer


def refuse_remote_code(directory: Path, trust_remote_code: bool) -> None:
    """A model that ships its own Python code (an `auto_map` in its configs) loads only when the user
    opted in; say so clearly instead of letting transformers fail somewhere later."""
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        try:
            mapping = json.loads((directory / name).read_text(encoding="utf-8")).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        if mapping:
            raise LorakitError(
                f"{directory / name}: this model runs its own Python code (auto_map); "
                "pass --trust-remote-code (trust_remote_code=True) only if you trust its source"
            )
