"""The generating routes: POST /v1/completions and POST /v1/chat/completions, whole or streamed.

A request becomes one `Job` per prompt (chat: one; completions: one per prompt in the list, each its own
choice). Whatever happens, every job is closed when the request ends, which unpins its adapter and, if it
is still waiting or generating, takes its row out of the batch at the next step. That includes a client
that goes away: a stream's closing is seen by Starlette, and a non-streamed request watches for the
ASGI `http.disconnect` message while it waits. A row that fails makes only its own request fail (500).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lorakit.serve import responses
from lorakit.serve.engine import Delta, Failed, Finished, PromptLogprobs
from lorakit.serve.errors import APIError
from lorakit.serve.protocol import ChatRequest, CompletionRequest, SamplingRequest, parse_body
from lorakit.serve.sampling import TokenLogprob
from lorakit.serve.server import DEFAULT_COMPLETION_TOKENS, Job, Server


@dataclass
class Outcome:
    """A finished row as the response needs it."""

    text: str = ""
    reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


async def completions(server: Server, request: Request):
    body = parse_body(await request.body(), CompletionRequest)
    scored = body.echo and body.logprobs is not None
    prompts = body.prompts()
    jobs = await _start_all(server, body, [lambda p=p: server.completion_prompt(p) for p in prompts],
                            body.max_tokens, DEFAULT_COMPLETION_TOKENS, "prompt", body.logprobs, scored)
    texts = [p if isinstance(p, str) else server.tokenizer.decode(p) for p in prompts]
    request_id, logprobs = responses.new_id("cmpl"), responses.Logprobs(server.tokenizer)

    def choice(i: int, outcome: Outcome, reason: str | None, prompt_part: bool) -> dict:
        echoed = body.echo and prompt_part
        scores = None
        if body.logprobs is not None:
            first = jobs[i].row.prompt_ids[0] if scored and prompt_part else None
            infos = [*(outcome.prompt_logprobs if echoed else ()), *outcome.logprobs]
            scores = logprobs.completion(infos, first, 0 if echoed else len(texts[i]))
        return responses.completion_choice(i, (texts[i] if echoed else "") + outcome.text, reason, scores)

    if body.stream:
        async def events() -> AsyncIterator[str]:
            counts = [0, 0]
            for i, job in enumerate(jobs):
                first = True
                async for piece, outcome in _pieces(job):
                    reason = outcome.reason if outcome is not None else None
                    yield responses.sse(responses.completion_chunk(request_id, body.model,
                                                                   choice(i, piece, reason, first)))
                    first = False
                    if outcome is not None:
                        counts = [counts[0] + outcome.prompt_tokens, counts[1] + outcome.completion_tokens]
            if _wants_usage(body):
                yield responses.sse(responses.completion_chunk(request_id, body.model, None,
                                                               responses.usage(*counts)))

        return _stream(jobs, events())
    async with _cancel_on_disconnect(request.receive, jobs):
        outcomes = await asyncio.gather(*(_collect(job) for job in jobs))
    counts = responses.usage(sum(o.prompt_tokens for o in outcomes),
                             sum(o.completion_tokens for o in outcomes))
    return responses.completion_body(request_id, body.model, [choice(i, o, o.reason, True)
                                                              for i, o in enumerate(outcomes)], counts)


async def chat_completions(server: Server, request: Request):
    body = parse_body(await request.body(), ChatRequest)
    messages = [m.as_template_message() for m in body.messages]
    jobs = await _start_all(server, body, [lambda: server.chat_prompt(messages)], body.token_limit(), None,
                            "messages", body.logprob_count(), False)
    request_id, logprobs = responses.new_id("chatcmpl"), responses.Logprobs(server.tokenizer)
    scores = (lambda infos: logprobs.chat(infos)) if body.logprobs else (lambda infos: None)
    if body.stream:
        async def events() -> AsyncIterator[str]:
            role = {"role": "assistant", "content": ""}
            yield responses.sse(responses.chat_chunk(request_id, body.model, role))
            async for piece, outcome in _pieces(jobs[0]):
                if piece.text or piece.logprobs:
                    yield responses.sse(responses.chat_chunk(request_id, body.model, {"content": piece.text},
                                                             logprobs=scores(piece.logprobs)))
                if outcome is not None:
                    yield responses.sse(responses.chat_chunk(request_id, body.model, {}, outcome.reason))
                    if _wants_usage(body):
                        counts = responses.usage(outcome.prompt_tokens, outcome.completion_tokens)
                        yield responses.sse(responses.chat_chunk(request_id, body.model, {}, counts=counts))

        return _stream(jobs, events())
    async with _cancel_on_disconnect(request.receive, jobs):
        outcome = await _collect(jobs[0])
    return responses.chat_body(request_id, body.model, outcome.text, outcome.reason,
                               responses.usage(outcome.prompt_tokens, outcome.completion_tokens),
                               scores(outcome.logprobs))


PromptSource = Callable[[], Awaitable[list[int]]]


async def _start_all(server: Server, body: SamplingRequest, prompts: Sequence[PromptSource],
                     requested: int | None, default: int | None, param: str, logprobs: int | None,
                     scored: bool) -> list[Job]:
    """One pinned, queued job per prompt; on any error the ones already started are closed."""
    jobs: list[Job] = []
    try:
        for prompt in prompts:
            adapter = server.pool.acquire(body.model)
            try:
                prompt_ids = await prompt()
                max_tokens = server.token_budget(prompt_ids, requested, default, param)
            except BaseException:
                server.pool.release(adapter)
                raise
            jobs.append(server.start(adapter, prompt_ids, max_tokens, body, logprobs, scored))
    except BaseException:
        for job in jobs:
            job.close()
        raise
    return jobs


async def _pieces(job: Job) -> AsyncIterator[tuple[Outcome, Outcome | None]]:
    """A job's events as (piece, outcome): each piece holds new text/logprobs (the prompt's logprobs come
    in the first); the last has the whole outcome too. A failed row raises APIError(500)."""
    piece, whole = Outcome(), Outcome()
    async for event in job.events():
        if isinstance(event, PromptLogprobs):
            piece.prompt_logprobs = whole.prompt_logprobs = event.entries
        elif isinstance(event, Delta):
            piece.text, piece.logprobs = piece.text + event.text, [*piece.logprobs, *event.logprobs]
            whole.text, whole.logprobs = whole.text + event.text, [*whole.logprobs, *event.logprobs]
            yield piece, None
            piece = Outcome()
        elif isinstance(event, Failed):
            raise APIError(500, f"Generation failed: {type(event.error).__name__}: {event.error}",
                           type="server_error")
        else:
            assert isinstance(event, Finished)
            whole.reason = piece.reason = event.reason
            whole.prompt_tokens, whole.completion_tokens = event.prompt_tokens, event.completion_tokens
            yield piece, whole


async def _collect(job: Job) -> Outcome:
    async for _, outcome in _pieces(job):
        if outcome is not None:
            return outcome
    raise APIError(500, "Generation ended without a result.", type="server_error")


def _stream(jobs: list[Job], events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events, then [DONE]; an error mid-stream becomes an error event."""
    async def sse() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except APIError as err:
            yield responses.sse(err.body())
        yield responses.sse("[DONE]")

    return _JobStream(jobs, sse())


class _JobStream(StreamingResponse):
    """A stream that closes its jobs when it ends, however it ends, and as soon as the client leaves (also
    while no event is due: a row still waiting for its place sends nothing that could fail)."""

    def __init__(self, jobs: list[Job], content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.jobs = jobs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with _cancel_on_disconnect(receive, self.jobs):
            await super().__call__(scope, receive, send)


@asynccontextmanager
async def _cancel_on_disconnect(receive: Receive, jobs: list[Job]) -> AsyncIterator[None]:
    """Within the block, a client that disconnects cancels the jobs (once the whole body has been read, the
    next receive() returns only when the client goes); when the block ends, the jobs are closed."""
    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        _close(jobs)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
        _close(jobs)


def _close(jobs: list[Job]) -> None:
    for job in jobs:
        job.close()


def _wants_usage(body: SamplingRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage
