"""Load test of `lorakit serve`: 64 concurrent asyncio clients over 4 adapters and the base, with random
cancellations, against the continuous and the static scheduler in the same run; then RSS over 1,000
adapter load/unload cycles.

Each scheduler gets its own `lorakit serve` process (the embedded SmolLM2-135M-Instruct, 4 random rank-8
adapters, --max-batch-size 16 by default, an API key, an adapter root) on 127.0.0.1, and the same client
load for --duration seconds: every client loops over chat requests, greedy with `ignore_eos`, half "short" (8
tokens) and half "long" (48 tokens), half of them streamed; 10 % are cancelled after 0.05–2 s (the
client closes the connection). There are 60 distinct requests (6 prompts × 5 models × 2 lengths), each
sent many times; greedy, so every answer to one request must be the same text. The reference answer of
a request is the most common answer it got over both runs; an answer that differs from its reference but
equals another request's is "crossed", any other difference "differs". A request that neither completes
nor is cancelled by its client (timeout, reset) is "lost". Requests are bounded in time (600 s each) and
the run stops by itself.

    .venv/bin/python benchmarks/serve_load.py                  # ~15 minutes on 2 CPU cores
    .venv/bin/python benchmarks/serve_load.py --duration 30 --cycles 100      # a quick look
    .venv/bin/python benchmarks/serve_load.py --together --cycles 0           # both servers at once
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

KEY = "load-test-key"
CLIENTS, ADAPTERS, SHORT, LONG = 64, 4, 8, 48


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"short": [], "long": []})
    answers: list[tuple[tuple, str]] = field(default_factory=list)  # (request, content) of each completed one
    tokens: int = 0
    cancelled: int = 0
    server_errors: int = 0
    other_errors: int = 0
    lost: Counter[str] = field(default_factory=Counter)  # by exception

    def check(self, reference: dict[tuple, str]) -> tuple[int, int]:
        """(crossed, differs): answers that are another request's reference, or no request's."""
        crossed = differs = 0
        for key, content in self.answers:
            if content != reference[key]:
                crossed += any(content == v for k, v in reference.items() if k != key)
                differs += all(content != v for k, v in reference.items() if k != key)
        return crossed, differs


async def post(port: int, path: str, body: dict, timeout: float = 600) -> tuple[int, str]:
    """(status, body) of one request on its own connection (closed on cancellation: the client leaves)."""
    data = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                     "Connection: close\r\n\r\n"
                     .encode() + data)
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"chunked" in head.lower():
        payload = _unchunk(payload)
    return status, payload.decode()


def _unchunk(payload: bytes) -> bytes:
    out = b""
    while payload:
        size, _, rest = payload.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, payload = out + rest[:n], rest[n + 2:]
    return out


def answer(status: int, text: str, stream: bool) -> tuple[str, int]:
    """(content, completion tokens) of a chat reply, streamed (server-sent events) or not."""
    if not stream:
        body = json.loads(text)
        return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]
    content, tokens = "", 0
    for line in text.splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                content += chunk["choices"][0]["delta"].get("content") or ""
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return content, tokens


def request(model: str, messages: list[dict], max_tokens: int, stream: bool) -> dict:
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True,
            "stream": stream, "stream_options": {"include_usage": True} if stream else None}


async def client(port: int, jobs: list, deadline: float, tally: Tally, rng: random.Random) -> None:
    while time.monotonic() < deadline:
        key = rng.choice(jobs)  # (model, prompt index, kind)
        model, prompt, kind = key
        stream = rng.random() < 0.5
        body = request(model, PROMPTS[prompt], SHORT if kind == "short" else LONG, stream)
        task = asyncio.ensure_future(post(port, "/v1/chat/completions", body))
        start = time.monotonic()
        if rng.random() < 0.1:
            await asyncio.wait({task}, timeout=rng.uniform(0.05, 2.0))
            if not task.done():
                task.cancel()
                tally.cancelled += 1
                continue
        try:
            status, text = await task
        except (OSError, asyncio.TimeoutError, ValueError, IndexError) as err:
            tally.lost[type(err).__name__] += 1
            continue
        if status >= 500:
            tally.server_errors += 1
            continue
        if status != 200:
            tally.other_errors += 1
            continue
        content, tokens = answer(status, text, stream)
        tally.latencies[kind].append(time.monotonic() - start)
        tally.answers.append((key, content))
        tally.tokens += tokens


async def load(port: int, jobs: list, duration: float) -> tuple[Tally, float]:
    tally, deadline, rngs = Tally(), time.monotonic() + duration, [random.Random(i) for i in range(CLIENTS)]
    start = time.monotonic()
    await asyncio.gather(*(client(port, jobs, deadline, tally, rng) for rng in rngs))
    return tally, time.monotonic() - start


def references(tallies: list[Tally]) -> dict[tuple, str]:
    """Each request's most common answer over all runs."""
    seen: dict[tuple, Counter[str]] = {}
    for tally in tallies:
        for key, content in tally.answers:
            seen.setdefault(key, Counter())[content] += 1
    return {key: counts.most_common(1)[0][0] for key, counts in seen.items()}


def start_server(adapters: Path, port: int, scheduler: str, log: Path, threads: int | None,
                 max_batch_size: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "lorakit", "serve", "--port", str(port), "--scheduler", scheduler,
               "--max-batch-size", str(max_batch_size), "--adapter-root", str(adapters), "--api-key", KEY,
               *(f"--adapter=a{i}={adapters / f'a{i}'}" for i in range(ADAPTERS))]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    while True:
        try:
            health = urllib.request.Request(f"http://127.0.0.1:{port}/health",
                                            headers={"Authorization": f"Bearer {KEY}"})
            urllib.request.urlopen(health, timeout=5).read()
            return process
        except OSError:
            if process.poll() is not None:
                raise SystemExit(log.read_text()[-3000:]) from None
            time.sleep(0.5)


async def adapter_cycles(port: int, pid: int, cycles: int) -> list[tuple[int, float]]:
    """RSS (MB) of the server after each 100 load/unload cycles over 4 names and 4 directories; every 20th
    loaded adapter answers a request first (so mixed-batch stacks are built for it, then dropped)."""
    import psutil

    process, marks = psutil.Process(pid), []
    for i in range(1, cycles + 1):
        name = f"cycle{i % 4}"
        status, text = await post(port, "/v1/adapters", {"name": name, "path": f"a{i % ADAPTERS}"})
        assert status == 200, text
        if i % 20 == 0:
            status, text = await post(port, "/v1/chat/completions", request(name, PROMPTS[0], 2, False))
            assert status == 200, text
        status, text = await delete(port, name)
        assert status == 200, text
        if i % 100 == 0:
            marks.append((i, process.memory_info().rss / 2**20))
            print(f"  {i} cycles: RSS {marks[-1][1]:.0f} MB", file=sys.stderr, flush=True)
    return marks


async def delete(port: int, name: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"DELETE /v1/adapters/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                 "Connection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    return int(raw.split(b" ", 2)[1]), raw.decode(errors="replace")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (q = 50: the median); NaN without data."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100)[int(q) - 1]


def make_adapters(directory: Path) -> None:
    import torch

    from lorakit import LoraConfig, get_peft_model
    from lorakit.models.sources import load_causal_lm

    for i in range(ADAPTERS):
        torch.manual_seed(i)
        config = LoraConfig(r=8, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
        get_peft_model(load_causal_lm(None), config).save_pretrained(directory / f"a{i}")


def prompts(count: int) -> list[list[dict[str, str]]]:
    from lorakit.train.data import bundled_dataset_path

    lines = bundled_dataset_path("test").read_text(encoding="utf-8").splitlines()[:count]
    return [[m for m in json.loads(line)["messages"] if m["role"] == "user"] for line in lines]


PROMPTS = prompts(6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=150, help="seconds of load per scheduler")
    parser.add_argument("--cycles", type=int, default=1000,
                        help="adapter load/unload cycles (continuous server)")
    parser.add_argument("--port", type=int, default=18231)
    parser.add_argument("--max-batch-size", type=int, default=16, help="the server's (16 is its default)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the server (OMP_NUM_THREADS); 1 on a busy shared machine")
    parser.add_argument(
        "--together",
        action="store_true",
        help="run both servers and both loads at the same time (ports --port and --port + 1), "
        "so that a machine whose load changes from minute to minute weighs on both alike",
    )
    args = parser.parse_args()
    models = ["base", *(f"a{i}" for i in range(ADAPTERS))]
    jobs = [(m, p, kind) for m in models for p in range(len(PROMPTS)) for kind in ("short", "long")]
    rows, loads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        make_adapters(Path(tmp))
        if args.together:
            rows, loads = side_by_side(Path(tmp), args, jobs)
        for scheduler in () if args.together else ("continuous", "static"):
            log = Path(tmp) / f"{scheduler}.log"
            server = start_server(Path(tmp), args.port, scheduler, log, args.threads, args.max_batch_size)
            try:
                print(f"{scheduler}: {CLIENTS} clients for {args.duration:.0f} s ...", file=sys.stderr,
                      flush=True)
                before = os.getloadavg()[0]
                rows[scheduler] = asyncio.run(load(args.port, jobs, args.duration))
                loads[scheduler] = (before, os.getloadavg()[0])
                if scheduler == "continuous" and args.cycles:
                    print(f"{args.cycles} adapter load/unload cycles ...", file=sys.stderr, flush=True)
                    rss = asyncio.run(adapter_cycles(args.port, server.pid, args.cycles))
            finally:
                server.terminate()
                server.wait(timeout=60)
    report(rows, rss if args.cycles and not args.together else [], args.duration, args.max_batch_size)
    print("\nload average (1 min) at the start / end of each scheduler's load: "
          + ", ".join(f"{name} {a:.1f} / {b:.1f}" for name, (a, b) in loads.items()))


def side_by_side(adapters: Path, args: argparse.Namespace, jobs: list) -> tuple[dict, dict]:
    """Both schedulers' servers under their loads at the same time (no adapter cycles)."""
    names = ("continuous", "static")
    servers = [start_server(adapters, args.port + i, name, adapters / f"{name}.log", args.threads,
                            args.max_batch_size) for i, name in enumerate(names)]
    try:
        print(f"both: {CLIENTS} clients each for {args.duration:.0f} s ...", file=sys.stderr, flush=True)
        before = os.getloadavg()[0]

        async def both() -> list[tuple[Tally, float]]:
            return await asyncio.gather(*(load(args.port + i, jobs, args.duration) for i in range(2)))

        results = asyncio.run(both())
        after = os.getloadavg()[0]
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=60)
    return dict(zip(names, results)), {name: (before, after) for name in names}


def report(rows: dict[str, tuple[Tally, float]], rss: list[tuple[int, float]], duration: float,
           max_batch_size: int) -> None:
    print(f"\n{CLIENTS} clients, {ADAPTERS} adapters + base, {duration:.0f} s per scheduler, "
          f"--max-batch-size {max_batch_size}\n")
    print("| scheduler | completed | cancelled | 5xx | other errors | lost | crossed | differs | "
          "short p50 / p95 (s) | long p50 / p95 (s) | completion tok/s | requests/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    reference = references([t for t, _ in rows.values()])
    for name, (t, wall) in rows.items():
        short, long = t.latencies["short"], t.latencies["long"]
        crossed, differs = t.check(reference)
        print(f"| {name} | {len(t.answers)} | {t.cancelled} | {t.server_errors} | {t.other_errors} | "
              f"{sum(t.lost.values())} | {crossed} | {differs} | "
              f"{percentile(short, 50):.2f} / {percentile(short, 95):.2f} | "
              f"{percentile(long, 50):.2f} / {percentile(long, 95):.2f} | {t.tokens / wall:.1f} | "
              f"{len(t.answers) / wall:.2f} |")
    for name, (t, _) in rows.items():
        if t.lost:
            print(f"{name}: lost requests by error: {dict(t.lost)}")
    if len(rows) == 2:
        (c, cw), (s, sw) = rows["continuous"], rows["static"]
        p95 = percentile(c.latencies["short"], 95) / percentile(s.latencies["short"], 95)
        ratio = (c.tokens / cw) / (s.tokens / sw)
        print(f"\ncontinuous / static: short-request p95 {p95:.2f}x, throughput {ratio:.2f}x")
    if rss:
        print("\nRSS after adapter load/unload cycles: " + ", ".join(f"{n}: {mb:.0f} MB" for n, mb in rss))


if __name__ == "__main__":
    main()
