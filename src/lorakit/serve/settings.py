"""What `lorakit serve` is started with: batching, limits and security settings (one place for their
defaults, shared by the CLI, the scheduler and the HTTP guard)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServeSettings:
    # batching (scheduler.py)
    max_batch_size: int = 16  # most rows in the running batch
    max_prefill_tokens: int = 512  # most prompt tokens prefilled in one step (one longer prompt runs alone)
    batch_window_ms: float = 5.0
    scheduler: str = "continuous"  # or "static", to measure against
    # model and adapters
    max_adapters: int | None = None
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    adapter_root: Path | None = None  # runtime adapter loading only from inside this directory; None: off
    # limits (guard.py, limits.py, server.py)
    max_body_bytes: int = 4 * 2**20
    max_prompt_chars: int | None = None  # default: 64 characters per token of max_model_len
    # security (guard.py)
    host: str = "127.0.0.1"  # the address the server is bound to (Host headers are checked against it)
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed besides the server's own; "*": any
