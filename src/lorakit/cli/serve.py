"""`lorakit serve`: an OpenAI-compatible server for many adapters on one base model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lorakit.cli.app import ConfigOption, TrustRemoteCodeOption, app
from lorakit.device import DEVICE_HELP

SERVE_DTYPE_HELP = (
    "Base weights' dtype: float32, bfloat16 or float16 (or fp32, bf16, fp16), or auto: bf16 on a "
    "GPU that supports it, else fp32."
)


@app.command()
def serve(
    model: Annotated[
        str | None, typer.Option(help="Base model dir, .gguf or hub id (default: embedded SmolLM2).")
    ] = None,
    adapter: Annotated[
        list[str] | None, typer.Option(help="Adapter as NAME=DIR or DIR; repeat for several.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="LORAKIT_API_KEY",
            show_default=False,
            help="Require 'Authorization: Bearer KEY' on every route.",
        ),
    ] = None,
    allowed_origins: Annotated[
        list[str] | None,
        typer.Option(
            help="Browser origin (scheme://host:port) allowed to call the server, and whose host name is "
                 "accepted in Host headers; repeat for several; '*' turns both checks off."
        ),
    ] = None,
    adapter_root: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="Allow POST /v1/adapters, loading only from inside this directory (off without it).",
        ),
    ] = None,
    max_adapters: Annotated[
        int | None,
        typer.Option(
            min=0, help="Most adapters held at once; loading more evicts the least recently used idle one."
        ),
    ] = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Most requests in the running batch.")] = 16,
    max_prefill_tokens: Annotated[
        int,
        typer.Option(min=1, help="Most prompt tokens prefilled in one step (a longer prompt runs alone)."),
    ] = 512,
    scheduler: Annotated[
        str,
        typer.Option(
            help="continuous (requests join the running batch) or static (each batch runs to its end; for "
                 "comparison)."
        ),
    ] = "continuous",
    max_model_len: Annotated[
        int | None,
        typer.Option(min=2, help="Prompt + completion token limit (default: the model's context length)."),
    ] = None,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Largest request body; larger ones get 413.")] = 4
    * 2**20,
    max_prompt_chars: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Longest prompt in characters, checked before tokenising (default: 64 per token of the "
                 "context length).",
        ),
    ] = None,
    batch_window_ms: Annotated[
        float,
        typer.Option(
            min=0.0, help="How long an idle scheduler waits for concurrent requests to prefill together."
        ),
    ] = 5.0,
    dtype: Annotated[str, typer.Option(help=SERVE_DTYPE_HELP)] = "float32",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    trust_remote_code: Annotated[bool, TrustRemoteCodeOption] = False,
    config: Annotated[Optional[Path], ConfigOption] = None,  # noqa: UP045 - as in the other commands
) -> None:
    """Serve the base model and its adapters over HTTP (OpenAI API: /v1/models, /v1/completions,
    /v1/chat/completions). A request's "model" picks the adapter; the base model's name, or "base", none."""
    from lorakit.cli.common import parse_adapter_specs
    from lorakit.errors import LorakitError, MissingDependencyError

    try:
        import uvicorn

        from lorakit.serve.app import create_app
        from lorakit.serve.scheduler import SCHEDULERS
        from lorakit.serve.server import Server
        from lorakit.serve.settings import ServeSettings
    except ImportError as err:
        raise MissingDependencyError(
            f"lorakit serve needs {err.name}: pip install 'lorakit[serve]'"
        ) from None
    from lorakit.device import resolve_device, resolve_dtype

    names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    if dtype not in (*names, *names.values(), "auto"):
        raise LorakitError(f"--dtype {dtype!r}: use float32, bfloat16, float16 (fp32, bf16, fp16) or auto")
    where = resolve_device(device)
    torch_dtype = str(resolve_dtype(names.get(dtype, dtype), where)).removeprefix("torch.")
    if scheduler not in SCHEDULERS:
        raise LorakitError(f"--scheduler {scheduler!r}: use {' or '.join(SCHEDULERS)}")
    settings = ServeSettings(
        max_batch_size=max_batch_size,
        max_prefill_tokens=max_prefill_tokens,
        batch_window_ms=batch_window_ms,
        scheduler=scheduler,
        max_adapters=max_adapters,
        max_model_len=max_model_len,
        adapter_root=adapter_root,
        max_body_bytes=max_body_bytes,
        max_prompt_chars=max_prompt_chars,
        host=host,
        api_key=api_key or None,
        allowed_origins=tuple(allowed_origins or ()),
    )
    server = Server.load(model, parse_adapter_specs(adapter), settings, dtype=torch_dtype, device=str(where),
                         trust_remote_code=trust_remote_code)
    typer.echo(f"serving {server.base_name} with adapters: {', '.join(server.pool.names()) or 'none'} "
               f"on http://{host}:{port}/v1")
    if settings.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host} without --api-key: anyone who reaches this address can use "
                   "the server", err=True)
    uvicorn.run(create_app(server), host=host, port=port, log_level="info")
