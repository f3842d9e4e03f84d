"""`lorakit generate` and `lorakit chat`: talk to a model, with or without adapters, chosen by name."""

from __future__ import annotations

import contextlib
from typing import Annotated

import typer

from lorakit.cli.app import TrustRemoteCodeOption, app

ModelOption = Annotated[str | None, typer.Option(help="Base model dir, .gguf or hub id (default: embedded SmolLM2).")]
AdapterOption = Annotated[list[str] | None, typer.Option(help="Adapter as NAME=DIR or DIR; repeat for several.")]
UseOption = Annotated[str | None, typer.Option(help="Adapter to use (by name), or 'base' (default: the first).")]
TokensOption = Annotated[int, typer.Option(min=1, help="Maximum new tokens.")]
TemperatureOption = Annotated[float, typer.Option(min=0.0, help="0 = greedy.")]
TrustOption = Annotated[bool, TrustRemoteCodeOption]


def _reply(model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int, temperature: float, use_base: bool) -> str:
    import torch

    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    disabled = model.disable_adapter() if use_base and hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with torch.no_grad(), disabled:
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    model: ModelOption = None,
    adapter: AdapterOption = None,
    use: UseOption = None,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_new_tokens: TokensOption = 128,
    temperature: TemperatureOption = 0.0,
    trust_remote_code: TrustOption = False,
) -> None:
    """Answer one prompt (chat template applied) and print the reply."""
    from lorakit.cli.common import load_model_with_adapters

    loaded, tokenizer, _ = load_model_with_adapters(model, adapter, active=use, trust_remote_code=trust_remote_code)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    typer.echo(_reply(loaded, tokenizer, messages, max_new_tokens, temperature, use_base=use == "base"))


@app.command()
def chat(
    model: ModelOption = None,
    adapter: AdapterOption = None,
    use: UseOption = None,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_new_tokens: TokensOption = 256,
    temperature: TemperatureOption = 0.0,
    trust_remote_code: TrustOption = False,
) -> None:
    """Interactive chat. Commands: /use NAME (or /use base) switches adapter, /reset, /quit."""
    from lorakit.cli.common import load_model_with_adapters

    loaded, tokenizer, names = load_model_with_adapters(model, adapter, active=use, trust_remote_code=trust_remote_code)
    current = use or (names[0] if names else "base")
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    typer.echo(f"chatting with {current} (adapters: {', '.join(names) or 'none'}); /use NAME, /reset, /quit")
    while True:
        try:
            line = input(f"[{current}] > ").strip()
        except EOFError:
            break
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = history[:1] if system else []
            continue
        if line.startswith("/use"):
            wanted = line.removeprefix("/use").strip()
            if wanted != "base" and wanted not in names:
                typer.echo(f"no adapter {wanted!r}; loaded: {', '.join(names) or 'none'}")
                continue
            if wanted != "base":
                loaded.set_adapter(wanted, inference_mode=True)
            current = wanted
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        answer = _reply(loaded, tokenizer, history, max_new_tokens, temperature, use_base=current == "base")
        history.append({"role": "assistant", "content": answer})
        typer.echo(answer)
