"""Where models come from: the embedded default model, local directories, .gguf files and hub ids."""

from lorakit.models.default import (
    cache_root,
    convert_gguf,
    default_model_path,
    embedded_gguf_path,
    gguf_cache_dir,
)
from lorakit.models.sources import download_snapshot, load_causal_lm, load_tokenizer, resolve_model_source

__all__ = [
    "cache_root", "convert_gguf", "default_model_path", "download_snapshot", "embedded_gguf_path",
    "gguf_cache_dir", "load_causal_lm", "load_tokenizer", "resolve_model_source",
]
