"""`lorakit serve`: an OpenAI-compatible HTTP server for many LoRA adapters on one base model.

Needs the `serve` extra (`pip install 'lorakit[serve]'`: FastAPI and uvicorn). Modules: `protocol` (the
OpenAI wire format and errors), `engine` (batched generation with streaming), `adapters` (runtime loading,
LRU eviction), `server` (model thread and batching scheduler), `app` (the HTTP routes).
"""
