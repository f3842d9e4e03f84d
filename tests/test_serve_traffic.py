"""`lorakit serve` under real traffic: continuous batching, one bad request among good ones, clients that
leave, size and shape limits, keep-alive after errors, logprobs against `model(...)`, Prometheus metrics.

A real server on 127.0.0.1 with the tiny random chat model and three adapters. Answers of "innocent"
requests batched with bad or cancelled ones must equal the same requests sent alone."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from serve_support import Running, save_adapter  # noqa: E402

from lorakit import PeftModel  # noqa: E402
from lorakit.layers import BASE_ROW  # noqa: E402
from lorakit.models.sources import load_causal_lm, load_tokenizer  # noqa: E402
from lorakit.serve.batch import Batch  # noqa: E402
from lorakit.serve.engine import Row, TextTracker  # noqa: E402
from lorakit.serve.sampling import pick_tokens  # noqa: E402

ADAPTERS = {"alpha": 2, "beta": 4, "gamma": 8}
MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def adapter_dirs(tiny_chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("traffic-adapters")
    return {name: save_adapter(tiny_chat_model_dir, root / name, rank, 10 + i)
            for i, (name, rank) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def running(tiny_chat_model_dir: Path, adapter_dirs: dict[str, Path]):
    server = Running.start(tiny_chat_model_dir, list(adapter_dirs.items()), max_batch_size=16,
                           max_model_len=MAX_MODEL_LEN, batch_window_ms=10)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(tiny_chat_model_dir: Path, adapter_dirs: dict[str, Path]) -> PeftModel:
    """The same adapters on a separately loaded model, for `model(...)` numbers."""
    model = PeftModel.from_pretrained(load_causal_lm(tiny_chat_model_dir), adapter_dirs["alpha"],
                                      adapter_name="alpha")
    for name in list(ADAPTERS)[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    return model.eval()


@torch.no_grad()
def reference_logprobs(model: PeftModel, adapter: str, ids: list[int]) -> torch.Tensor:
    """log_softmax(model(ids)) (positions, vocab) with `adapter` alone ("base": none)."""
    if adapter == "base":
        with model.disable_adapter():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
    else:
        model.set_adapter(adapter, inference_mode=True)
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits, dim=-1)


def _completion(running: Running, model: str, prompt, **kwargs) -> tuple[int, dict]:
    return running.raw("POST", "/v1/completions", {"model": model, "prompt": prompt, "temperature": 0,
                                                   **kwargs})


def _slow_steps(running: Running, monkeypatch: pytest.MonkeyPatch, seconds: float) -> list:
    """Make every batch step take `seconds` longer; returns the list the rows that leave are appended to."""
    left: list = []
    step = running.server.batch.step

    def slow(model, newcomers):
        time.sleep(seconds)
        report = step(model, newcomers)
        left.extend(report.left)
        return report

    monkeypatch.setattr(running.server.batch, "step", slow)
    return left


# ---- continuous batching ------------------------------------------------------------------------------


def test_short_request_joins_a_running_long_one(running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short request sent while a long one generates joins at the next step and ends long before it."""
    _slow_steps(running, monkeypatch, 0.01)
    alone = _completion(running, "beta", "Hello there", max_tokens=8,
                        ignore_eos=True)[1]["choices"][0]["text"]
    done: dict[str, float] = {}

    def long() -> None:
        status, body = _completion(running, "alpha", "Once upon a time", max_tokens=150, ignore_eos=True)
        assert status == 200 and body["usage"]["completion_tokens"] == 150
        done["long"] = time.monotonic()

    thread = threading.Thread(target=long)
    thread.start()
    time.sleep(0.3)  # the long request is ~20 steps in
    sent = time.monotonic()
    status, body = _completion(running, "beta", "Hello there", max_tokens=8, ignore_eos=True)
    done["short"] = time.monotonic()
    thread.join()
    assert status == 200 and body["choices"][0]["text"] == alone
    # 8 steps against the long one's ~130 left: it ends well before (a static batch would make it wait for
    # the long one to end). Relative, so that a slow or busy machine does not matter.
    assert done["long"] - done["short"] > 0.5 * (done["long"] - sent), (done, sent)


def test_rows_join_and_leave_and_the_cache_follows_the_live_rows(tiny_chat_model_dir: Path,
                                                                   reference: PeftModel) -> None:
    """Rows of different prompt lengths join a running batch at different steps; each gets the tokens it
    gets alone, every step is one forward for all adapters, and the cache is as wide as the longest
    live row."""
    tokenizer = load_tokenizer(tiny_chat_model_dir)
    prompts = [("alpha", "A long opening prompt with many words in it to make it wide", 12),
               ("base", "Short", 20), ("gamma", "Middle sized prompt here", 6), ("beta", "Hi", 9)]
    rows = [Row(prompt_ids=tokenizer(text)["input_ids"], adapter=BASE_ROW if name == "base" else name,
                max_tokens=n, emit=lambda event: None, ignore_eos=True) for name, text, n in prompts]
    forwards = []
    hook = reference.get_base_model().register_forward_hook(lambda *args: forwards.append(1))
    batch = Batch(tokenizer, tokenizer.pad_token_id, {tokenizer.eos_token_id})
    widths = []
    try:
        with torch.no_grad():
            for step in range(40):
                forwards.clear()
                joining = [rows[step]] if step < 2 else [rows[2], rows[3]] if step == 5 else []
                running_before = bool(batch.rows)
                batch.step(reference, joining)
                # One decoding forward for all running rows, whatever their adapters; one prefill for
                # newcomers.
                assert len(forwards) == running_before + bool(joining)
                if batch.rows:
                    lengths = [len(r.prompt_ids) + len(r.tokens) - 1 for r in batch.rows]
                    widths.append((batch.mask.shape[1], max(lengths)))
                    assert batch.cache.layers[0].keys.shape[:3] == (len(batch.rows), 2, max(lengths))
    finally:
        hook.remove()
        batch.close()
    assert all(width == longest for width, longest in widths), widths
    assert widths[-1][0] < max(w for w, _ in widths)  # the cache shrank once the widest row left
    for row, (name, _, n) in zip(rows, prompts):
        assert row.finish_reason == "length" and len(row.tokens) == n
        expected = _greedy(reference, name, row.prompt_ids, n)
        assert row.tokens == expected, name


@torch.no_grad()
def _greedy(model: PeftModel, adapter: str, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(reference_logprobs(model, adapter, ids)[-1].argmax()))
    return ids[-n:]


# ---- isolation ----------------------------------------------------------------------------------------

BAD_SAMPLING = [
    ("seed 2**70", {"seed": 2**70, "temperature": 1.0}, 400, "seed"),
    ("seed -(2**70)", {"seed": -(2**70), "temperature": 1.0}, 400, "seed"),
    ("temperature 1e-45", {"temperature": 1e-45, "seed": 1}, 200, None),
    ("temperature 1e-300 top_p 0.5", {"temperature": 1e-300, "top_p": 0.5, "seed": 1}, 200, None),
    ("top_p 5e-324", {"temperature": 1.0, "top_p": 5e-324, "seed": 1}, 200, None),
    ("temperature 2.5", {"temperature": 2.5}, 400, "temperature"),
    ("top_p 1.5", {"top_p": 1.5}, 400, "top_p"),
    ("top_logprobs 21", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, 400, "top_logprobs"),
]


def test_odd_sampling_values_never_fail_the_batch(running: Running) -> None:
    """The issue's 500s: each odd value gets a 400 or is served, and innocent requests batched with it are
    answered as when sent alone."""
    innocent = [("alpha", "Say hello."), ("beta", "Count to three."), ("base", "Name a colour.")]

    def chat(model: str, text: str, **extra) -> tuple[int, dict]:
        body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 10, **extra}
        return running.raw("POST", "/v1/chat/completions", body)

    alone = [chat(m, t, temperature=0)[1]["choices"][0]["message"]["content"] for m, t in innocent]
    with ThreadPoolExecutor(len(BAD_SAMPLING) + 3 * len(innocent)) as pool:
        bad = [pool.submit(chat, "gamma", "Pick a number.", **extra) for _, extra, _, _ in BAD_SAMPLING]
        good = [pool.submit(chat, m, t, temperature=0) for m, t in innocent * 3]
        for (name, _, status, param), future in zip(BAD_SAMPLING, bad):
            got, body = future.result()
            assert got == status, (name, body)
            if status == 400:
                assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"
            else:
                assert body["choices"][0]["message"]["content"] is not None
        for i, future in enumerate(good):
            got, body = future.result()
            assert got == 200 and body["choices"][0]["message"]["content"] == alone[i % len(innocent)]


def test_sampling_is_row_wise_and_never_raises() -> None:
    """One row's NaN logits, denormal temperature or top_p change no other row; degenerate rows still get
    a token; a seeded row's draw does not depend on the other rows."""
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    logits[1] = float("nan")
    logits[2] = -float("inf")
    logits[3, 7] = float("inf")
    temps, top_p = [0.0, 1.0, 1.0, 1e-300, 5e-324, 1.0], [1.0, 0.9, 0.5, 0.5, 1.0, 5e-324]
    gens = [None] + [torch.Generator().manual_seed(i) for i in range(5)]
    chosen = pick_tokens(logits, temps, top_p, gens)
    assert chosen[0] == logits[0].argmax() and chosen[3] == 7 and chosen[4] == logits[4].argmax()
    assert chosen[5] == logits[5].argmax() and 0 <= chosen[1] < 50 and 0 <= chosen[2] < 50
    alone = pick_tokens(logits[5:], temps[5:], top_p[5:], [torch.Generator().manual_seed(4)])
    assert alone[0] == chosen[5]
    draws = {int(pick_tokens(logits[:1], [1.0], [1.0],
                             [torch.Generator().manual_seed(s)])[0]) for s in range(40)}
    assert len(draws) > 5  # temperature 1 does sample


def test_sampled_tokens_follow_the_tempered_top_p_distribution() -> None:
    """4,000 seeded rows at T = 0.7, top_p = 0.9 over 5 tokens: frequencies within 3 standard errors of
    softmax(logits / T) renormalised over the top-p head; tokens outside the head never drawn."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0])
    probs = torch.softmax(logits / 0.7, dim=-1).double()
    head = int((probs.cumsum(0) - probs < 0.9).sum())  # tokens whose predecessors hold < 90 % of the mass
    expected = torch.zeros(5, dtype=torch.float64)
    expected[:head] = probs[:head] / probs[:head].sum()
    n = 4000
    tokens = pick_tokens(logits.expand(n, -1), [0.7] * n, [0.9] * n,
                         [torch.Generator().manual_seed(s) for s in range(n)])
    frequency = torch.bincount(tokens, minlength=5).double() / n
    error = (expected * (1 - expected) / n).sqrt()
    assert head == 3 and frequency[head:].sum() == 0
    assert ((frequency - expected).abs() <= 3 * error + 1e-12).all(), (frequency, expected)


def test_greedy_rows_take_the_argmax_also_beside_a_nan_row() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    expected = logits.argmax(dim=-1)
    assert pick_tokens(logits, [0.0] * 3, [1.0] * 3, [None] * 3).tolist() == expected.tolist()
    logits[1, 4], logits[2] = float("inf"), float("nan")
    chosen = pick_tokens(logits, [0.0] * 3, [1.0] * 3, [None] * 3)
    assert chosen[0] == expected[0] and chosen[1] == 4 and 0 <= chosen[2] < 50


def test_a_failing_row_fails_only_its_request(running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    alone = _completion(running, "alpha", "The sky is", max_tokens=6)[1]["choices"][0]["text"]
    push = TextTracker.push

    def fragile(self, row, token, logprob=None):
        if row.adapter == "gamma":
            raise RuntimeError("this row's text handling broke")
        return push(self, row, token, logprob)

    monkeypatch.setattr(TextTracker, "push", fragile)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_completion, running, name, "The sky is", max_tokens=6)
                   for name in ("alpha", "gamma", "alpha", "gamma")]
        results = [f.result() for f in futures]
    for (status, body), name in zip(results, ("alpha", "gamma", "alpha", "gamma")):
        if name == "gamma":
            assert status == 500 and "this row's text handling broke" in body["error"]["message"]
        else:
            assert status == 200 and body["choices"][0]["text"] == alone


# ---- cancellation -------------------------------------------------------------------------------------


def _send_and_leave(running: Running, body: dict, read_first: bool) -> None:
    """Send a request on a raw socket and close it: at once, or after the first bytes of the answer."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", running.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        if read_first:
            seen = b""
            while b"data: " not in seen:  # a first token has been streamed: the row is running
                seen += sock.recv(4096)
        else:
            time.sleep(0.2)


@pytest.mark.parametrize("stream", [False, True], ids=["not streamed", "streamed"])
def test_a_client_that_leaves_frees_its_row(running: Running, monkeypatch: pytest.MonkeyPatch,
                                            stream: bool) -> None:
    left = _slow_steps(running, monkeypatch, 0.01)
    body = {"model": "beta", "prompt": "Tell me a story", "max_tokens": 200, "ignore_eos": True,
            "temperature": 0,
            "stream": stream}
    _send_and_leave(running, body, read_first=stream)
    scheduler, pool = running.server.scheduler, running.server.pool

    def freed() -> bool:  # the step reports the row before the scheduler's loop stores the batch it kept
        return bool(left) and scheduler.running == () and pool._pins["beta"] == 0

    deadline = time.monotonic() + 5
    while not freed() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(left) == 1 and left[0].finish_reason == "cancelled"
    assert len(left[0].tokens) < 60, len(left[0].tokens)  # gone within a few steps, not after 200
    assert scheduler.running == () and pool._pins["beta"] == 0


# ---- limits -------------------------------------------------------------------------------------------


def _nested(depth: int) -> bytes:
    return b'{"model": "alpha", "prompt": "hi", "x": ' + b"[" * depth + b"]" * depth + b"}"


LIMITS = [
    ("100k-level nested JSON", "/v1/completions", _nested(100_000), 400, "invalid_json"),
    ("33-level nested JSON", "/v1/completions", _nested(33), 400, "invalid_json"),
    ("lone surrogate in a prompt", "/v1/completions", b'{"model": "alpha", "prompt": "a\\ud800b"}', 400,
     "invalid_unicode"),
    ("lone surrogate in a message", "/v1/chat/completions",
     b'{"model": "alpha", "messages": [{"role": "user", "content": "\\udfff"}]}', 400, "invalid_unicode"),
    ("invalid UTF-8", "/v1/completions", b'{"model": "alpha", "prompt": "\xff\xfe"}', 400, "invalid_json"),
    ("NaN", "/v1/completions", b'{"model": "alpha", "prompt": "hi", "temperature": NaN}', 400,
     "invalid_json"),
    ("prompt over the character cap", "/v1/completions",
     json.dumps({"model": "alpha", "prompt": "w" * (64 * MAX_MODEL_LEN + 1)}).encode(), 400,
     "context_length_exceeded"),
    ("token ids out of range", "/v1/completions", b'{"model": "alpha", "prompt": [1, 2, 99999999]}', 400,
     "invalid_value"),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), [c[1:] for c in LIMITS],
                         ids=[c[0] for c in LIMITS])
def test_limits_answer_4xx(running: Running, path: str, body: bytes, status: int, code: str) -> None:
    got, error = running.raw("POST", path, body)
    assert got == status, error
    assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["code"] == code


def test_a_10_mb_body_is_refused_before_it_is_read(running: Running) -> None:
    """413 from the headers alone: the server answers while the 10 MB body has not even been sent."""
    with socket.create_connection(("127.0.0.1", running.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000000\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"


def test_body_without_content_length_is_counted(running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(running.server.settings, "max_body_bytes", 1000)
    connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
    chunks = iter([b'{"model": "alpha", "prompt": "', b"x" * 2000, b'"}'])
    connection.request("POST", "/v1/completions", body=chunks, encode_chunked=True,
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"


def test_tokenising_a_long_prompt_does_not_stall_other_clients(running: Running,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt near the body limit is tokenised off the event loop: /health answers meanwhile."""
    monkeypatch.setattr(running.server, "max_prompt_chars", 10**8)
    prompt = "hello world, " * 100_000  # 1.3 MB, ~1 s of tokenising here; then 400 for its length
    with ThreadPoolExecutor(1) as pool:
        sent = time.monotonic()
        big = pool.submit(_completion, running, "alpha", prompt)
        time.sleep(0.3)
        start = time.monotonic()
        assert running.raw("GET", "/health")[0] == 200
        health = time.monotonic() - start
        assert big.result()[1]["error"]["code"] == "context_length_exceeded"
        big_took = time.monotonic() - sent
    # Were tokenising on the event loop, /health would wait for all of it.
    assert health < 0.25 * big_took, (health, big_took)


@pytest.mark.parametrize(("path", "code"), [("x" * 5000, "invalid_adapter_path"),
                                            ("a/" + "y" * 300, "invalid_adapter_path"),
                                            ("bad\x00path", "invalid_adapter_path")])
def test_long_or_invalid_adapter_paths_get_400(tiny_chat_model_dir: Path, tmp_path: Path, path: str,
                                               code: str) -> None:
    server = Running.start(tiny_chat_model_dir, [], adapter_root=tmp_path)
    try:
        status, error = server.raw("POST", "/v1/adapters", {"name": "x", "path": path})
        assert status == 400 and error["error"]["code"] == code and error["error"]["param"] == "path"
    finally:
        server.stop()


def test_keep_alive_connection_survives_errors(running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a 500 (and after 4xx) the same connection serves the next request."""
    def broken(messages):
        raise RuntimeError("template engine exploded")

    connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with monkeypatch.context() as patch:
        patch.setattr(running.server, "chat_prompt", broken)
        status, error = Running.send(connection, "POST", "/v1/chat/completions", chat)
    assert status == 500 and error["error"]["type"] == "server_error"
    assert "exploded" in error["error"]["message"]
    assert Running.send(connection, "POST", "/v1/completions", b"{")[0] == 400
    assert Running.send(connection, "GET", "/v1/nothing")[0] == 404
    status, body = Running.send(connection, "POST", "/v1/chat/completions", chat)
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
    connection.close()


# ---- logprobs -----------------------------------------------------------------------------------------


def test_chat_logprobs_equal_model_log_softmax_with_the_rows_adapter(running: Running, reference: PeftModel,
                                                                     tiny_chat_model_dir: Path) -> None:
    """Sent in one batch with other adapters' requests, each answer's logprobs are log_softmax(model(...))
    of its own adapter at its own tokens; top_logprobs are the best ones, the chosen (greedy) one first."""
    tokenizer = load_tokenizer(tiny_chat_model_dir)
    question = [{"role": "user", "content": "Name three fruits."}]
    prompt = tokenizer(tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"]

    def ask(model: str, stream: bool = False):
        return running.client.chat.completions.create(model=model, messages=question, max_tokens=8,
                                                      temperature=0,
                                                      logprobs=True, top_logprobs=3, stream=stream,
                                                      extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(3) as pool:
        replies = dict(zip(["gamma", "alpha", "base"], pool.map(ask, ["gamma", "alpha", "base"])))
    for adapter, reply in replies.items():
        tokens = _greedy(reference, adapter, prompt, 8)
        expected = reference_logprobs(reference, adapter, prompt + tokens)[len(prompt) - 1:-1]
        content = reply.choices[0].logprobs.content
        assert [c.token for c in content] == [tokenizer.decode([t]) for t in tokens], adapter
        got = torch.tensor([c.logprob for c in content])
        torch.testing.assert_close(got, expected.gather(-1, torch.tensor(tokens)[:, None])[:, 0], atol=1e-4,
                                   rtol=0)
        for entry, row in zip(content, expected):
            best = row.topk(3)
            tops = [tokenizer.decode([i]) for i in best.indices.tolist()]
            assert [t.token for t in entry.top_logprobs] == tops
            torch.testing.assert_close(torch.tensor([t.logprob for t in entry.top_logprobs]), best.values,
                                       atol=1e-4, rtol=0)
            assert entry.bytes == list(entry.token.encode())
    streamed = [c.choices[0].logprobs.content for c in ask("gamma", stream=True)
                if c.choices and c.choices[0].logprobs is not None]
    whole = replies["gamma"].choices[0].logprobs.content
    assert [e.token for chunk in streamed for e in chunk] == [e.token for e in whole]
    # Alone rather than in a batch of three: the same numbers up to float rounding.
    assert [e.logprob for chunk in streamed for e in chunk] == pytest.approx([e.logprob for e in whole],
                                                                             abs=1e-4)


def test_completion_echo_logprobs_score_token_prompts_as_lm_eval_asks(running: Running,
                                                                      reference: PeftModel) -> None:
    """lm-eval's loglikelihood request: token-id prompts, echo, logprobs=1, max_tokens=1."""
    prompts = [[504, 3300, 314, 1789, 28, 260], [19556, 17, 253, 1357]]
    status, body = _completion(running, "beta", prompts, max_tokens=1, logprobs=1, echo=True)
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    for ids, choice in zip(prompts, body["choices"]):
        scores = choice["logprobs"]
        expected = reference_logprobs(reference, "beta", ids)
        assert len(scores["tokens"]) == len(ids) + 1 and scores["token_logprobs"][0] is None
        assert scores["top_logprobs"][0] is None and scores["text_offset"] == sorted(scores["text_offset"])
        want = expected[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(scores["token_logprobs"][1:-1]), want, atol=1e-4, rtol=0)
        generated = int(expected[-1].argmax())
        assert scores["tokens"][-1] == running.server.tokenizer.decode([generated])
        for position, top in enumerate(scores["top_logprobs"][1:]):
            assert max(top.values()) == pytest.approx(float(expected[position].max()), abs=1e-4)
        assert choice["text"] == running.server.tokenizer.decode(ids) + scores["tokens"][-1]
    status, body = _completion(running, "beta", prompts[0], max_tokens=0, logprobs=0, echo=True)
    assert status == 200 and body["usage"]["completion_tokens"] == 0
    assert len(body["choices"][0]["logprobs"]["tokens"]) == len(prompts[0])


def test_completion_logprobs_without_echo(running: Running, reference: PeftModel) -> None:
    ids = [504, 3300, 314]
    status, body = _completion(running, "alpha", ids, max_tokens=4, logprobs=2, ignore_eos=True)
    scores = body["choices"][0]["logprobs"]
    tokens = _greedy(reference, "alpha", ids, 4)
    expected = reference_logprobs(reference, "alpha", ids + tokens)[len(ids) - 1:-1]
    torch.testing.assert_close(torch.tensor(scores["token_logprobs"]),
                               expected.gather(-1, torch.tensor(tokens)[:, None])[:, 0], atol=1e-4, rtol=0)
    assert all(len(top) in (2, 3) for top in scores["top_logprobs"])  # the 2 best and the chosen one
    assert scores["text_offset"][0] == len(running.server.tokenizer.decode(ids))


# ---- metrics ------------------------------------------------------------------------------------------


def _metrics(running: Running) -> dict[str, float]:
    status, text = running.raw("GET", "/metrics")
    assert status == 200
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name.replace(',model_name="' + running.server.base_name + '"', "")
                   .replace('model_name="' + running.server.base_name + '",', "")
                   .replace('{model_name="' + running.server.base_name + '"}', "")] = float(value)
    return values


def test_metrics_count_requests_tokens_and_latencies_by_vllm_names(running: Running) -> None:
    before = _metrics(running)
    ids = [504, 3300, 314]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda m: _completion(running, m, ids, max_tokens=5, ignore_eos=True),
                      ["alpha", "alpha", "base"]))
    after = _metrics(running)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew("vllm:generation_tokens_total") == 15 and grew("vllm:prompt_tokens_total") == 9
    assert grew('vllm:request_success_total{finished_reason="length"}') == 3
    assert grew('lorakit:adapter_requests_total{adapter="alpha"}') == 2
    assert grew('lorakit:adapter_requests_total{adapter="base"}') == 1
    for histogram in ("vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds",
                      "vllm:e2e_request_latency_seconds"):
        assert grew(f"{histogram}_count") == 3, histogram
    assert grew("vllm:iteration_tokens_total_count") >= 5 and grew("lorakit:batch_size_count") >= 5
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
