"""`lorakit serve`: an OpenAI-compatible HTTP server for many LoRA adapters on one base model.

Needs the `serve` extra (`pip install 'lorakit[serve]'`: FastAPI, uvicorn, prometheus-client). Modules,
from the wire inwards: `app` (routes), `guard` (host, origin, API key, content type, body size), `limits`
(JSON checks), `protocol` (requests), `responses` (response bodies, logprobs), `generation` (the
generating routes: jobs, streaming, disconnects), `server` (threads, prompts, rows), `scheduler`
(continuous batching policy), `batch` (the running batch and its KV cache), `engine` (rows and their
text), `sampling` (per-row token choice and logprobs), `adapters` (runtime loading, LRU eviction),
`metrics` (Prometheus), `settings`, `errors`.
"""
