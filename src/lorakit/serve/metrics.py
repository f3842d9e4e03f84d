"""Prometheus metrics of `lorakit serve` (GET /metrics), named as vLLM names the ones that correspond, so
that dashboards and alerts written for vLLM work unchanged.

| metric | type | what |
|---|---|---|
| vllm:num_requests_running | gauge | rows in the running batch |
| vllm:num_requests_waiting | gauge | requests queued for a place in the batch |
| vllm:prompt_tokens_total | counter | prompt tokens prefilled |
| vllm:generation_tokens_total | counter | tokens generated |
| vllm:iteration_tokens_total | histogram | tokens per step (running rows plus prefilled prompts) |
| lorakit:batch_size | histogram | rows per step |
| vllm:time_to_first_token_seconds | histogram | arrival to first token |
| vllm:time_per_output_token_seconds | histogram | mean time between a request's later tokens |
| vllm:e2e_request_latency_seconds | histogram | arrival to last token |
| vllm:request_success_total | counter | requests ended, by finished_reason (stop, length, cancelled, error) |
| lorakit:adapter_requests_total | counter | requests ended, by adapter ("base" for none) |

Every metric carries vLLM's `model_name` label (the base model's name). Each server has its own registry,
so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lorakit.layers import BASE_ROW

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    """The server's metrics; updated on the event loop after each step (`step`) and on queueing."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels, r = ["model_name"], self.registry
        self._running = Gauge("vllm:num_requests_running", "Requests in the running batch.", labels,
                              registry=r)
        self._waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to join the batch.", labels,
                              registry=r)
        self._prompt = Counter("vllm:prompt_tokens", "Prompt tokens prefilled.", labels, registry=r)
        self._generated = Counter("vllm:generation_tokens", "Tokens generated.", labels, registry=r)
        self._iteration = Histogram("vllm:iteration_tokens_total", "Tokens per step.", labels,
                                    buckets=_TOKENS, registry=r)
        self._batch = Histogram("lorakit:batch_size", "Rows per step.", labels, buckets=_TOKENS[:8],
                                registry=r)
        self._ttft = Histogram("vllm:time_to_first_token_seconds", "Arrival to first token.", labels,
                               buckets=_LATENCY, registry=r)
        self._tpot = Histogram("vllm:time_per_output_token_seconds", "Mean time between later tokens.",
                               labels, buckets=_LATENCY, registry=r)
        self._e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.", labels,
                              buckets=_LATENCY, registry=r)
        self._success = Counter("vllm:request_success", "Requests ended, by finish reason.",
                                [*labels, "finished_reason"], registry=r)
        self._adapter = Counter("lorakit:adapter_requests", "Requests ended, by adapter.",
                                [*labels, "adapter"],
                                registry=r)
        self.model_name = model_name

    def set_queue(self, running: int, waiting: int) -> None:
        self._running.labels(self.model_name).set(running)
        self._waiting.labels(self.model_name).set(waiting)

    def step(self, report, waiting: int) -> None:
        """Record one scheduler step (`report`: a batch.StepReport)."""
        name, now = self.model_name, time.monotonic()
        self.set_queue(len(report.rows), waiting)
        rows = len(report.rows) + len(report.left)
        if rows:
            self._batch.labels(name).observe(rows)
            self._iteration.labels(name).observe(report.decoded_rows + report.prefill_tokens)
        self._prompt.labels(name).inc(report.prefill_tokens)
        for row in report.left:
            self._generated.labels(name).inc(len(row.tokens))
            self._success.labels(name, row.finish_reason or "error").inc()
            self._adapter.labels(name, "base" if row.adapter == BASE_ROW else row.adapter).inc()
            self._e2e.labels(name).observe(now - row.arrived)
            if row.first_token_at is not None:
                self._ttft.labels(name).observe(row.first_token_at - row.arrived)
                if len(row.tokens) > 1:
                    self._tpot.labels(name).observe((now - row.first_token_at) / (len(row.tokens) - 1))

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
