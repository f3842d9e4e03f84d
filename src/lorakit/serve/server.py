"""The serving core: the model thread, the scheduler, and requests turned into batch rows.

Threads: the asyncio event loop (HTTP, bookkeeping), one tokenizer thread (chat templates and tokenising,
so a long prompt never stalls other clients), and one model thread that runs every batch step and every
adapter load/unload, one after another. The event loop never waits on the model, so it keeps answering
(errors, /v1/models, /health, new requests queueing) while the batch generates. See `scheduler` for the
batching policy and `batch` for how rows join and leave the running batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from lorakit.serve.adapters import AdapterPool
from lorakit.serve.batch import Batch
from lorakit.serve.engine import Event, Failed, Finished, Row
from lorakit.serve.errors import APIError
from lorakit.serve.metrics import Metrics
from lorakit.serve.protocol import SamplingRequest
from lorakit.serve.scheduler import Scheduler
from lorakit.serve.settings import ServeSettings

log = logging.getLogger("lorakit.serve")
T = TypeVar("T")

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
CHARS_PER_TOKEN_CAP = 64  # default prompt cap in characters: this many per token of the context length


class ModelThread:
    """The one thread that touches the model (batch steps and adapter changes, in submission order)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-model")

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Job:
    """A submitted row: its events as they come, and `close()` (idempotent) when the caller is done — which
    cancels the row if it is still waiting or generating (it leaves at the next step) and unpins its
    adapter."""

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
            # Wakes a reader still waiting for the row's events.
            self._queue.put_nowait(Finished("cancelled", len(self.row.prompt_ids), 0))


class Server:
    """A base model with adapters behind a batching scheduler; `app.create_app` puts HTTP in front."""

    def __init__(self, model: nn.Module, tokenizer, base_names: Iterable[str],
                 settings: ServeSettings) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.model_thread = ModelThread()
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-tokenize")
        self.pool = AdapterPool(model, base_names, self._change_adapters, settings.max_adapters,
                                settings.adapter_root)
        config = model.config
        self.vocab_size = int(config.vocab_size)
        context = getattr(config, "max_position_embeddings", None) or 2048
        self.max_model_len = settings.max_model_len or context
        self.max_prompt_chars = settings.max_prompt_chars or CHARS_PER_TOKEN_CAP * self.max_model_len
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.metrics = Metrics(self.base_name)
        self.batch = Batch(tokenizer, int(pad) if pad is not None else 0,
                           {int(t) for t in eos_ids if t is not None})
        self.scheduler = Scheduler(self.batch, self.model_thread.run, lambda: self.pool.model, self.metrics,
                                   policy=settings.scheduler, max_batch_size=settings.max_batch_size,
                                   max_prefill_tokens=settings.max_prefill_tokens,
                                   batch_window_ms=settings.batch_window_ms)

    @classmethod
    def load(cls, model: str | None, adapters: Iterable[tuple[str, Path]], settings: ServeSettings,
             dtype: str = "float32", device: str | None = None, trust_remote_code: bool = False) -> Server:
        """Load the base model and tokenizer from a model source, then the named adapters. A model that
        ships its own code loads only with `trust_remote_code`."""
        import torch

        from lorakit.models.sources import load_causal_lm, load_tokenizer, resolve_model_source

        directory = resolve_model_source(model)
        tokenizer = load_tokenizer(directory, trust_remote_code=trust_remote_code)
        base = load_causal_lm(directory, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
                              attn_implementation="sdpa")
        base.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        names = [directory.name, "base", *([model] if model else [])]
        server = cls(base, tokenizer, names, settings)
        server.pool.load_initial(adapters)
        return server

    @property
    def base_name(self) -> str:
        return self.pool.base_names[0]

    async def _change_adapters(self, fn: Callable[[], T]) -> T:
        # Between two steps, on the model thread; the batch leaves its row_adapters() block first, so layers
        # look at their adapters afresh at the next step.
        def change() -> T:
            self.batch.close()
            return fn()

        return await self.model_thread.run(change)

    # ---- prompts ---------------------------------------------------------------------------------

    async def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        self._check_chars(sum(len(m["content"]) for m in messages), "messages")

        def render() -> list[int]:
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                          tokenize=False)
            except Exception as err:  # no template, or it rejects these messages (jinja has its own errors)
                raise APIError(400, f"Cannot apply the model's chat template to these messages: {err}",
                               param="messages", code="invalid_value") from None
            # The rendered template already holds the special tokens it needs.
            return self._tokenize(text, add_special_tokens=False)

        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, render)

    async def completion_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):  # token ids
            if any(not 0 <= t < self.vocab_size for t in prompt):
                raise APIError(400, f"Token ids must lie in [0, {self.vocab_size}).", param="prompt",
                               code="invalid_value")
            return prompt
        self._check_chars(len(prompt), "prompt")
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, self._tokenize,
                                                                prompt)

    def _tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # On the tokenizer thread; fast tokenizers let go of the GIL meanwhile, so the event loop runs on.
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def _check_chars(self, count: int, param: str) -> None:
        if count > self.max_prompt_chars:
            raise APIError(400, f"The {param} hold {count} characters; this server takes at most "
                           f"{self.max_prompt_chars} (--max-prompt-chars).", param=param,
                           code="context_length_exceeded")

    def token_budget(self, prompt_ids: list[int], requested: int | None, default: int | None,
                     param: str) -> int:
        """max_tokens for a request, checked against the context length. Without `requested`: `default`
        (None: unlimited) cut to what the context leaves."""
        if not prompt_ids:
            raise APIError(400, "The prompt is empty.", param=param, code="invalid_value")
        limit, left = self.max_model_len, self.max_model_len - len(prompt_ids)
        wanted = requested if requested is not None else min(default or left, left)
        # requested == 0 only comes with echo (protocol.py): scoring the prompt needs no room after it.
        if len(prompt_ids) + wanted > limit or (wanted < 1 and requested is None):
            asked = len(prompt_ids) + max(wanted, 1)
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{asked} tokens ({len(prompt_ids)} in the {param}, {max(wanted, 1)} in the completion). "
                f"Please reduce the length of the {param} or completion.", param=param,
                code="context_length_exceeded")
        return wanted

    # ---- rows ------------------------------------------------------------------------------------

    def start(self, adapter: str, prompt_ids: list[int], max_tokens: int, request: SamplingRequest,
              logprobs: int | None = None, prompt_logprobs: bool = False) -> Job:
        """Queue a row; `adapter` comes pinned from `pool.acquire` (the job unpins it)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        row = Row(prompt_ids=prompt_ids, adapter=adapter, max_tokens=max_tokens,
                  emit=lambda event: loop.call_soon_threadsafe(queue.put_nowait, event),
                  temperature=request.temperature, top_p=request.top_p, stop=request.stop_strings(),
                  seed=request.seed, ignore_eos=request.ignore_eos, logprobs=logprobs,
                  prompt_logprobs=prompt_logprobs)
        self.scheduler.submit(row)
        return Job(self, row, queue)

    def shutdown(self) -> None:
        """Stop generating: running and queued rows end at the next step."""
        self.scheduler.cancel_all()
        self.model_thread.close()
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict[str, Any]:
        return {"base": self.base_name, "adapters": self.pool.names(), "max_model_len": self.max_model_len,
                "max_batch_size": self.settings.max_batch_size, "max_adapters": self.settings.max_adapters,
                "scheduler": self.settings.scheduler, "running": len(self.scheduler.running),
                "waiting": self.scheduler.waiting, "steps": self.scheduler.steps,
                "largest_batch": self.scheduler.largest_batch}
