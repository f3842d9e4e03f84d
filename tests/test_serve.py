"""`lorakit serve` end to end: a real server on 127.0.0.1 (uvicorn in a background thread) with a tiny
random Llama and four adapters, driven by the official `openai` client. Answers must equal offline
`generate` with the same adapter, streamed or not, alone or in a batch of 32 concurrent requests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")


from serve_support import Running, save_adapter  # noqa: E402

from lorakit import PeftModel  # noqa: E402
from lorakit.layers import BASE_ROW, LoraLayer, mixed  # noqa: E402
from lorakit.models.sources import load_causal_lm, load_tokenizer  # noqa: E402
from lorakit.serve.adapters import AdapterPool  # noqa: E402
from lorakit.serve.batch import Batch  # noqa: E402
from lorakit.serve.engine import Delta, Finished, Row, TextTracker  # noqa: E402
from lorakit.serve.errors import APIError  # noqa: E402
from lorakit.serve.server import Server  # noqa: E402
from lorakit.serve.settings import ServeSettings  # noqa: E402

ADAPTERS = {"alpha": 2, "beta": 4, "gamma": 8, "delta": 3}  # name -> rank
EXTRA = {"extra1": 4, "extra2": 2}  # loaded at runtime
MAX_MODEL_LEN = 160
QUESTIONS = ["What is 2 + 2?", "Name a colour.", "Say hello.", "Write one word.", "Count to three.",
             "Which day is today?", "Spell cat.", "Pick a number."]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-adapters")
    return {name: save_adapter(tiny_chat_model_dir, root / name, rank, seed)
            for seed, (name, rank) in enumerate({**ADAPTERS, **EXTRA}.items())}


@pytest.fixture(scope="module")
def running(tiny_chat_model_dir: Path, adapter_dirs: dict[str, Path]):
    settings = ServeSettings(
        max_batch_size=16,
        max_adapters=5,
        max_model_len=MAX_MODEL_LEN,
        batch_window_ms=20,
        adapter_root=adapter_dirs["alpha"].parent,
    )
    server = Server.load(str(tiny_chat_model_dir), [(n, adapter_dirs[n]) for n in ADAPTERS], settings)
    running = Running(server)
    yield running
    running.stop()


class Offline:
    """Greedy answers from `generate` on a separately loaded model with the same adapters."""

    def __init__(self, model_dir: Path, adapter_dirs: dict[str, Path]) -> None:
        self.tokenizer = load_tokenizer(model_dir)
        self.model = PeftModel.from_pretrained(
            load_causal_lm(model_dir), adapter_dirs["alpha"], adapter_name="alpha"
        )
        for name in list(ADAPTERS)[1:]:
            self.model.load_adapter(adapter_dirs[name], adapter_name=name)
        self.model.eval()

    def chat_ids(self, question: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def answer(self, adapter: str, ids: list[int], max_new_tokens: int) -> tuple[str, int]:
        """(text, number of new tokens) for adapter `adapter` ("base" for none)."""
        if adapter != "base":
            self.model.set_adapter(adapter, inference_mode=True)
        with self.model.disable_adapter() if adapter == "base" else contextlib.nullcontext():
            out = self.model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[0, len(ids):].tolist()
        return self.tokenizer.decode(new, skip_special_tokens=True), len(new)


@pytest.fixture(scope="module")
def offline(tiny_chat_model_dir: Path, adapter_dirs: dict[str, Path]) -> Offline:
    return Offline(tiny_chat_model_dir, adapter_dirs)


def _chat(client, model: str, question: str, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          temperature=kwargs.pop("temperature", 0), **kwargs)


def test_models_lists_base_and_adapters(running: Running, tiny_chat_model_dir: Path) -> None:
    ids = [m.id for m in running.client.models.list().data]
    assert ids[0] == tiny_chat_model_dir.name
    assert set(ids[1:]) >= set(ADAPTERS)


def test_each_adapter_answers_as_offline_generate(running: Running, offline: Offline) -> None:
    first_answers = set()
    for i, name in enumerate([*ADAPTERS, "base"]):
        question = QUESTIONS[i]
        reply = _chat(running.client, name, question, max_tokens=12)
        expected, count = offline.answer(name, offline.chat_ids(question), 12)
        assert reply.choices[0].message.content == expected, name
        assert reply.usage.prompt_tokens == len(offline.chat_ids(question))
        assert reply.usage.completion_tokens == count and reply.model == name
        assert reply.choices[0].finish_reason in ("stop", "length")
        first_answers.add(offline.answer(name, offline.chat_ids(QUESTIONS[0]), 12)[0])
    assert len(first_answers) > 1, "the adapters should change the answers"

    completion = running.client.completions.create(
        model="gamma", prompt="The sky is", max_tokens=10, temperature=0
    )
    ids = offline.tokenizer("The sky is")["input_ids"]
    assert completion.choices[0].text == offline.answer("gamma", ids, 10)[0]
    assert completion.usage.prompt_tokens == len(ids)


def test_streaming_returns_the_same_text(running: Running) -> None:
    for name, question in [("alpha", QUESTIONS[1]), ("delta", QUESTIONS[2]), ("base", QUESTIONS[3])]:
        whole = _chat(running.client, name, question, max_tokens=20).choices[0].message.content
        chunks = list(_chat(running.client, name, question, max_tokens=20, stream=True,
                            stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
        assert chunks[-2].choices[0].finish_reason in ("stop", "length")
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    # Tokens arrive as they are produced, not all at the end.
    start, arrivals = time.perf_counter(), []
    for chunk in _chat(running.client, "base", QUESTIONS[0], max_tokens=120, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - start)
    assert len(arrivals) > 10 and arrivals[0] < 0.5 * arrivals[-1], arrivals
    whole = (
        running.client.completions.create(model="beta", prompt="Once", max_tokens=15, temperature=0)
        .choices[0]
        .text
    )
    streamed = running.client.completions.create(
        model="beta", prompt="Once", max_tokens=15, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole


def test_batch_checks_adapters_once_per_set_of_rows_not_per_token(offline: Offline,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch opens one row_adapters() block while its rows stay the same (and one per prefill)."""
    looked_up: list[str] = []
    real = mixed._factor_tensors
    monkeypatch.setattr(
        mixed, "_factor_tensors", lambda layer, name: looked_up.append(name) or real(layer, name)
    )
    ids = [offline.chat_ids(q) for q in QUESTIONS[:2]]
    rows = [Row(prompt_ids=ids[0], adapter="alpha", max_tokens=2, emit=lambda event: None),
            Row(prompt_ids=ids[1], adapter="beta", max_tokens=6, emit=lambda event: None)]
    tokenizer = offline.tokenizer
    batch = Batch(tokenizer, tokenizer.pad_token_id, {tokenizer.eos_token_id})
    with torch.no_grad():
        batch.step(offline.model, rows)
        while batch.rows:
            batch.step(offline.model, [])
    batch.close()
    layers = sum(isinstance(m, LoraLayer) for m in offline.model.modules())  # each carries every adapter
    lengths = [len(row.tokens) for row in rows]
    # The prefill of both rows, both rows while the shorter one runs, then the longer one alone: three blocks,
    # however many tokens.
    expected = 2 * layers + 2 * layers + (layers if lengths[0] != lengths[1] else 0)
    assert len(looked_up) == expected, (lengths, len(looked_up), layers)
    for row, ids_ in zip(rows, ids):
        text, _ = offline.answer(row.adapter, ids_, row.max_tokens)
        assert tokenizer.decode(row.tokens, skip_special_tokens=True) == text, row.adapter


def test_32_concurrent_requests_over_4_adapters_are_batched(running: Running) -> None:
    jobs = [(name, QUESTIONS[i % len(QUESTIONS)], 4 + i % 9) for i, name in enumerate(list(ADAPTERS) * 8)]
    alone = {job: _chat(running.client, job[0], job[1], max_tokens=job[2]).choices[0].message.content
             for job in set(jobs)}
    before = running.server.scheduler.largest_batch
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _chat(running.client, job[0], job[1], max_tokens=job[2]), jobs))
    for job, reply in zip(jobs, together):
        assert reply.choices[0].message.content == alone[job], job
    assert before == 1 and running.server.scheduler.largest_batch > 4, running.server.describe()


def test_stop_strings_and_seeded_sampling(running: Running) -> None:
    full = _chat(running.client, "beta", QUESTIONS[4], max_tokens=24).choices[0].message.content
    assert len(full) > 6
    stop = full[3:6]
    cut = _chat(running.client, "beta", QUESTIONS[4], max_tokens=24, stop=[stop, "\x00never"])
    assert cut.choices[0].message.content == full[:full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = _chat(running.client, "beta", QUESTIONS[4], max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[:full.find(stop)]
    sampled = [
        _chat(running.client, "gamma", QUESTIONS[5], max_tokens=16, temperature=1.5, top_p=0.9, seed=seed)
        .choices[0]
        .message.content
        for seed in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_runtime_load_unload_and_lru_eviction(running: Running, adapter_dirs: dict[str, Path]) -> None:
    for name in ("delta", "gamma", "beta", "alpha"):  # alpha most, delta least recently used
        _chat(running.client, name, "Hi", max_tokens=1)
    status, body = running.raw(
        "POST", "/v1/adapters", {"name": "extra1", "path": str(adapter_dirs["extra1"])}
    )
    assert status == 200 and body["evicted"] == []  # 5 of --max-adapters 5
    assert _chat(running.client, "extra1", "Hi", max_tokens=3).choices[0].message.content is not None
    status, body = running.raw(
        "POST", "/v1/adapters", {"name": "extra2", "path": str(adapter_dirs["extra2"])}
    )
    assert status == 200 and body["evicted"] == ["delta"]
    with pytest.raises(openai.NotFoundError):
        _chat(running.client, "delta", "Hi", max_tokens=1)
    assert {m.id for m in running.client.models.list().data} >= {"alpha", "beta", "gamma", "extra1", "extra2"}

    assert (
        running.raw("POST", "/v1/adapters", {"name": "extra2", "path": str(adapter_dirs["extra2"])})[0] == 409
    )
    status, body = running.raw("POST", "/v1/adapters", {"name": "x", "path": "/no/such/dir"})
    assert status == 400 and body["error"]["param"] == "path"
    assert running.raw("DELETE", "/v1/adapters/extra1")[0] == 200
    assert running.raw("DELETE", "/v1/adapters/extra1")[0] == 404
    # Put the original four back for the other tests (extra2 is the least recently used now).
    assert running.raw("DELETE", "/v1/adapters/extra2")[0] == 200
    assert (
        running.raw("POST", "/v1/adapters", {"name": "delta", "path": str(adapter_dirs["delta"])})[0] == 200
    )


def test_adapters_in_use_are_never_evicted_or_deleted(running: Running) -> None:
    gate = threading.Event()
    running.server.model_thread._executor.submit(gate.wait)  # hold the model thread: requests stay queued
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_chat, running.client, "alpha", "Hi", max_tokens=2)
            deadline = time.monotonic() + 10
            while not running.server.pool._pins["alpha"]:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            status, body = running.raw("DELETE", "/v1/adapters/alpha")
            assert status == 409 and body["error"]["code"] == "adapter_in_use"
            gate.set()
            assert pending.result(timeout=30).choices[0].message.content is not None
    finally:
        gate.set()


def test_pool_eviction_skips_pinned_adapters(
    tiny_chat_model_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    async def run_now(fn):
        return fn()

    pool = AdapterPool(load_causal_lm(tiny_chat_model_dir), ["base"], run_now, max_adapters=2,
                       adapter_root=adapter_dirs["alpha"].parent)
    pool.load_initial([("alpha", adapter_dirs["alpha"]), ("beta", adapter_dirs["beta"])])
    assert pool.acquire("alpha") == "alpha"  # alpha is pinned (by a running request) ...
    pool.release(pool.acquire("beta"))  # ... and the least recently used one; beta is idle
    assert asyncio.run(pool.load("gamma", str(adapter_dirs["gamma"]))) == ["beta"]
    assert pool.names() == ["alpha", "gamma"] and sorted(pool.model.peft_config) == ["alpha", "gamma"]
    pool.acquire("gamma")
    with pytest.raises(APIError) as err:  # everything pinned: refuse instead of evicting
        asyncio.run(pool.load("delta", str(adapter_dirs["delta"])))
    assert err.value.status == 409 and pool.names() == ["alpha", "gamma"]


def test_text_deltas_hold_back_split_characters_and_stop_prefixes(tiny_chat_model_dir: Path) -> None:
    """Streamed pieces never show half a character or the start of a stop string that then completes."""
    tokenizer = load_tokenizer(tiny_chat_model_dir)
    events = []
    row = Row(prompt_ids=[1], adapter=BASE_ROW, max_tokens=100, emit=events.append, stop=("STOP", "never"))
    tracker = TextTracker(tokenizer, {tokenizer.eos_token_id})
    for token in tokenizer("Grüße 🙂 aus Köln, ST and STOP here")["input_ids"]:
        tracker.push(row, token)
        if row.done:
            break
    pieces = [e.text for e in events if isinstance(e, Delta)]
    assert "".join(pieces) == "Grüße 🙂 aus Köln, ST and " and not any("\ufffd" in p for p in pieces)
    assert events[-1] == Finished("stop", 1, len(row.tokens))


BAD_REQUESTS = [
    (
        "unknown adapter",
        "/v1/chat/completions",
        {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
        404,
        "model",
        "model_not_found",
    ),
    ("bad JSON", "/v1/chat/completions", b'{"model": "alpha", "messages": [', 400, None, "invalid_json"),
    ("not an object", "/v1/completions", b"[1, 2]", 400, None, "invalid_json"),
    (
        "missing messages",
        "/v1/chat/completions",
        {"model": "alpha"},
        400,
        "messages",
        "missing_required_parameter",
    ),
    ("missing model", "/v1/completions", {"prompt": "hi"}, 400, "model", "missing_required_parameter"),
    (
        "empty messages",
        "/v1/chat/completions",
        {"model": "alpha", "messages": []},
        400,
        "messages",
        "invalid_value",
    ),
    (
        "bad role",
        "/v1/chat/completions",
        {"model": "alpha", "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "messages.0.role",
        "invalid_value",
    ),
    (
        "temperature too high",
        "/v1/completions",
        {"model": "alpha", "prompt": "hi", "temperature": 3},
        400,
        "temperature",
        "invalid_value",
    ),
    (
        "top_p zero",
        "/v1/completions",
        {"model": "alpha", "prompt": "hi", "top_p": 0},
        400,
        "top_p",
        "invalid_value",
    ),
    (
        "max_tokens zero",
        "/v1/completions",
        {"model": "alpha", "prompt": "hi", "max_tokens": 0},
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "max_tokens a string",
        "/v1/completions",
        {"model": "alpha", "prompt": "hi", "max_tokens": "10"},
        400,
        "max_tokens",
        "invalid_value",
    ),
    ("n > 1", "/v1/completions", {"model": "alpha", "prompt": "hi", "n": 2}, 400, "n", "invalid_value"),
    (
        "five stops",
        "/v1/completions",
        {"model": "alpha", "prompt": "hi", "stop": list("abcde")},
        400,
        "stop",
        "invalid_value",
    ),
    (
        "prompt too long",
        "/v1/completions",
        {"model": "alpha", "prompt": "word " * 400},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    (
        "completion too long",
        "/v1/chat/completions",
        {"model": "beta", "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_MODEL_LEN},
        400,
        "messages",
        "context_length_exceeded",
    ),
    ("empty prompt", "/v1/completions", {"model": "alpha", "prompt": ""}, 400, "prompt", "invalid_value"),
    ("adapter without path", "/v1/adapters", {"name": "x"}, 400, "path", "missing_required_parameter"),
    (
        "adapter named like the base",
        "/v1/adapters",
        {"name": "base", "path": "/tmp"},
        400,
        "name",
        "invalid_value",
    ),
    (
        "adapter named like a module attribute",
        "/v1/adapters",
        {"name": "eval", "path": "alpha"},
        400,
        "name",
        "invalid_value",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(
    running: Running, path: str, body, status: int, param, code: str
) -> None:
    got, error = running.raw("POST", path, body)
    assert got == status, error
    assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["message"]
    assert error["error"]["type"] == "invalid_request_error"
    assert (error["error"]["param"], error["error"]["code"]) == (param, code)


def test_server_survives_errors_and_unknown_routes(running: Running) -> None:
    status, error = running.raw("GET", "/v1/nothing-here")
    assert status == 404 and set(error["error"]) == {"message", "type", "param", "code"}
    assert running.raw("GET", "/v1/completions")[0] == 405
    assert running.raw("DELETE", "/v1/adapters/base")[0] == 400
    with pytest.raises(openai.BadRequestError) as err:
        _chat(running.client, "alpha", "hi", max_tokens=MAX_MODEL_LEN * 2)
    assert err.value.code == "context_length_exceeded"
    assert _chat(running.client, "alpha", "Still there?", max_tokens=3).choices[0].message.content is not None



def test_cli_serves_until_interrupted(tiny_chat_model_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    """`lorakit serve` as a user runs it: a subprocess on 127.0.0.1, stopped by Ctrl-C (SIGINT)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "lorakit",
        "serve",
        "--model",
        str(tiny_chat_model_dir),
        "--port",
        str(port),
        "--adapter",
        f"alpha={adapter_dirs['alpha']}",
        "--max-model-len",
        "64",
    ]
    # The API key comes from the environment, as a deployment would pass it (never on the command line).
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "LORAKIT_API_KEY": "cli-key"})
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0, timeout=30
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                models = [m.id for m in client.models.list().data]
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
                time.sleep(0.2)
        assert models == [tiny_chat_model_dir.name, "alpha"]
        assert _chat(client, "alpha", "Hi", max_tokens=3).usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            client.with_options(api_key="wrong").models.list()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
