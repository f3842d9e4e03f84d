"""The serving core: one model thread, a batching scheduler, and requests turned into batch rows.

Threads: the asyncio event loop (HTTP, tokenisation, bookkeeping) and one model thread that runs every
generation batch and every adapter load/unload, one after another. The event loop never waits on the
model, so it keeps answering (errors, /v1/models, new requests queueing) while a batch generates.

Batching: requests queue up; the scheduler takes the first, waits a few milliseconds (`batch_window_ms`)
for concurrent ones to arrive, and runs up to `max_batch_size` of them — whatever their adapters — as
one batch (`engine.generate_batch`). Requests arriving during a batch form the next one (static batches,
no joining a running batch).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from lorakit.serve.adapters import AdapterPool
from lorakit.serve.engine import Event, Failed, Finished, Row, generate_batch
from lorakit.serve.protocol import APIError, SamplingRequest

log = logging.getLogger("lorakit.serve")
T = TypeVar("T")

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclass
class ServeSettings:
    max_batch_size: int = 16
    max_adapters: int | None = None
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    batch_window_ms: float = 5.0


class ModelThread:
    """The one thread that touches the model (generation and adapter changes, in submission order)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-model")

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Job:
    """A submitted request: its events as they come, and `close()` (idempotent) when the caller is done —
    which cancels the row if it is still generating and unpins its adapter."""

    def __init__(self, server: Server, row: Row, queue: asyncio.Queue[Event]) -> None:
        self._server, self.row, self._queue, self._closed = server, row, queue, False

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.row.cancelled = True
            self._server.pool.release(self.row.adapter)


class Server:
    """A base model with adapters behind a batching scheduler; `app.create_app` puts HTTP in front."""

    def __init__(self, model: nn.Module, tokenizer, base_names: Iterable[str], settings: ServeSettings) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.model_thread = ModelThread()
        self.pool = AdapterPool(model, base_names, self.model_thread.run, settings.max_adapters)
        config = model.config
        self.max_model_len = settings.max_model_len or getattr(config, "max_position_embeddings", None) or 2048
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos_ids = {int(t) for t in eos_ids if t is not None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self._queue: asyncio.Queue[Row] = asyncio.Queue()  # bound to the event loop on first use
        self._running: list[Row] = []
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0}

    @classmethod
    def load(cls, model: str | None, adapters: Iterable[tuple[str, Path]], settings: ServeSettings,
             dtype: str = "float32", device: str | None = None, trust_remote_code: bool = False) -> Server:
        """Load the base model and tokenizer from a model source, then the named adapters. A model that
        ships its own code loads only with `trust_remote_code`."""
        import torch

        from lorakit.models.sources import load_causal_lm, load_tokenizer, resolve_model_source

        directory = resolve_model_source(model)
        tokenizer = load_tokenizer(directory, trust_remote_code=trust_remote_code)
        base = load_causal_lm(directory, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
        base.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        names = [directory.name, "base", *([model] if model else [])]
        server = cls(base, tokenizer, names, settings)
        server.pool.load_initial(adapters)
        return server

    @property
    def base_name(self) -> str:
        return self.pool.base_names[0]

    # ---- requests -> rows ------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # no template, or the template rejects these messages (jinja raises its own)
            raise APIError(400, f"Cannot apply the model's chat template to these messages: {err}",
                           param="messages", code="invalid_value") from None
        # The rendered template already holds the special tokens it needs.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def token_budget(self, prompt_ids: list[int], requested: int | None, default: int | None, param: str) -> int:
        """max_tokens for a request, checked against the context length. Without `requested`: `default`
        (None: unlimited) cut to what the context leaves."""
        if not prompt_ids:
            raise APIError(400, "The prompt is empty.", param=param, code="invalid_value")
        limit, left = self.max_model_len, self.max_model_len - len(prompt_ids)
        wanted = requested if requested is not None else min(default or left, left)
        if wanted < 1 or len(prompt_ids) + wanted > limit:
            asked = len(prompt_ids) + max(wanted, 1)
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens. However, you requested {asked} tokens "
                f"({len(prompt_ids)} in the {param}, {max(wanted, 1)} in the completion). Please reduce the length "
                f"of the {param} or completion.", param=param, code="context_length_exceeded")
        return wanted

    def start(self, adapter: str, prompt_ids: list[int], max_tokens: int, request: SamplingRequest) -> Job:
        """Queue a row for the next batch; `adapter` comes pinned from `pool.acquire` (the job unpins it)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        row = Row(prompt_ids=prompt_ids, adapter=adapter, max_tokens=max_tokens,
                  emit=lambda event: loop.call_soon_threadsafe(queue.put_nowait, event),
                  temperature=request.temperature, top_p=request.top_p, stop=request.stop_strings(), seed=request.seed)
        self._queue.put_nowait(row)
        return Job(self, row, queue)

    # ---- the scheduler ---------------------------------------------------------------------------

    async def run_scheduler(self) -> None:
        """Form and run batches until cancelled (started by the app's lifespan)."""
        size, window = self.settings.max_batch_size, self.settings.batch_window_ms / 1000
        while True:
            batch = [await self._queue.get()]
            if self._queue.qsize() < size - 1:
                await asyncio.sleep(window)  # let requests sent at the same moment join this batch
            while len(batch) < size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [row for row in batch if not row.cancelled]
            if batch:
                self._running = batch
                self.stats["batches"] += 1
                self.stats["rows"] += len(batch)
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
                try:
                    await self.model_thread.run(lambda rows=batch: self._run_batch(rows))
                finally:
                    self._running = []

    def _run_batch(self, rows: list[Row]) -> None:
        try:
            generate_batch(self.pool.model, self.tokenizer, rows, self.pad_id, self.eos_ids)
        except Exception as err:  # one bad batch must not stop the server: its requests get the error
            log.exception("generation failed for a batch of %d", len(rows))
            for row in rows:
                if not row.done:
                    row.done = True
                    row.emit(Failed(err))

    def shutdown(self) -> None:
        """Stop generating: the running batch ends after its current step, queued requests are dropped."""
        for row in self._running:
            row.cancelled = True
        self.model_thread.close()

    def describe(self) -> dict[str, Any]:
        return {"base": self.base_name, "adapters": self.pool.names(), "max_model_len": self.max_model_len,
                "max_batch_size": self.settings.max_batch_size, "max_adapters": self.settings.max_adapters,
                **self.stats}
