"""`lorakit generate` and `lorakit chat`: talk to a model, with or without adapters, chosen by name; options
from ChatConfig and GenerateConfig."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import typer

from lorakit.cli.app import app
from lorakit.cli.options import config_command
from lorakit.device import DEVICE_HELP, DTYPE_HELP, DtypeName, valid_device_name
from lorakit.options import (
    TRUST_REMOTE_CODE_HELP,
    OptionError,
    Options,
    argument,
    finite,
    option,
    positive_ints,
)


@dataclass(kw_only=True)
class ChatConfig(Options):
    """Every option of `lorakit chat`: the model, its adapters, the one in use and how to sample."""

    model: str | None = option(None, help="Base model dir, .gguf or hub id (default: embedded SmolLM2).")
    adapter: list[str] | None = option(None, help="Adapter as NAME=DIR or DIR; repeat for several.",
                                       commas=False)
    use: str | None = option(None, help="Adapter to use (by name), or 'base' (default: the first).")
    system: str | None = option(None, help="System message.")
    max_new_tokens: int = option(256, help="Maximum new tokens.")
    temperature: float = option(0.0, help="0 = greedy.")
    device: str = option("auto", help=DEVICE_HELP)
    dtype: DtypeName = option("auto", help=DTYPE_HELP)
    trust_remote_code: bool = option(False, help=TRUST_REMOTE_CODE_HELP)

    def validate(self) -> None:
        positive_ints(self, ("max_new_tokens",))
        if not valid_device_name(self.device):
            raise OptionError("device", "auto, cpu, cuda or cuda:N", self.device)
        if not finite(self.temperature) or self.temperature < 0:
            raise OptionError("temperature", "a non-negative number (0 = greedy)", self.temperature)


@dataclass(kw_only=True)
class GenerateConfig(ChatConfig):
    """Every option of `lorakit generate`: chat's, shorter answers by default, and the one prompt."""

    prompt: str = argument(help="The user message.")
    max_new_tokens: int = option(128, help="Maximum new tokens.")


def _reply(model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int, temperature: float,
           use_base: bool) -> str:
    import torch

    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True).to(next(model.parameters()).device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    base_only = use_base and hasattr(model, "disable_adapter")
    with torch.no_grad(), model.disable_adapter() if base_only else contextlib.nullcontext():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                **sampling)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _generate(config: GenerateConfig) -> None:
    """Answer one prompt (chat template applied) and print the reply."""
    from lorakit.cli.common import load_model_with_adapters

    loaded, tokenizer, _ = load_model_with_adapters(config.model, config.adapter, active=config.use,
                                                    trust_remote_code=config.trust_remote_code,
                                                    device=config.device, dtype=config.dtype)
    messages = [{"role": "system", "content": config.system}] if config.system else []
    messages.append({"role": "user", "content": config.prompt})
    typer.echo(_reply(loaded, tokenizer, messages, config.max_new_tokens, config.temperature,
                      use_base=config.use == "base"))


def _chat(config: ChatConfig) -> None:
    """Interactive chat. Commands: /use NAME (or /use base) switches adapter, /reset, /quit."""
    from lorakit.cli.common import load_model_with_adapters

    loaded, tokenizer, names = load_model_with_adapters(config.model, config.adapter, active=config.use,
                                                        trust_remote_code=config.trust_remote_code,
                                                        device=config.device, dtype=config.dtype)
    current = config.use or (names[0] if names else "base")
    start: list[dict[str, str]] = [{"role": "system", "content": config.system}] if config.system else []
    history = list(start)
    typer.echo(f"chatting with {current} (adapters: {', '.join(names) or 'none'}); /use NAME, /reset, /quit")
    while True:
        try:
            line = input(f"[{current}] > ").strip()
        except EOFError:
            break
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = list(start)
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
        answer = _reply(loaded, tokenizer, history, config.max_new_tokens, config.temperature,
                        use_base=current == "base")
        history.append({"role": "assistant", "content": answer})
        typer.echo(answer)


app.command("generate")(config_command(GenerateConfig, _generate))
app.command("chat")(config_command(ChatConfig, _chat))
