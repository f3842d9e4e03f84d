"""Commands generated from config dataclasses, so the dataclass stays the one source of truth.

Each field of the config becomes `--field-name` with the field's type, default, help text and help panel
(declared with `lorakit.options.option`). A trainer config's `lora` field stands for the LoraConfig fields
in `train.config.LORA_OPTIONS`, each its own option (`--r`, `--lora-alpha`, ...). The `--config FILE.yaml`
option (cli/app.py) fills the same names from a file, and the command builds its config with the class's
`from_options`, the same path a YAML file or a dict takes.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from lorakit.cli.app import ConfigOption
from lorakit.options import field_help


def config_command(cls: type, run: Callable[[Any], None], doc: str) -> Callable[..., None]:
    """A Typer command function for config class `cls`: its options are the config's fields, its body
    `run(cls.from_options(options))`; `doc` is its help text."""

    def command(**options: Any) -> None:
        options.pop("config", None)
        run(cls.from_options(cli_values(cls, options)))

    command.__doc__ = doc
    config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation=Annotated[typing.Optional[Path], ConfigOption])  # noqa: UP045
    command.__signature__ = inspect.Signature([config, *config_parameters(cls)])  # type: ignore[attr-defined]
    return command


def option_fields(cls: type) -> list[tuple[dataclasses.Field, Any, Any]]:
    """(field, its type, its default) for every option of `cls`, a trainer's `lora` expanded."""
    from lorakit.config import LoraConfig
    from lorakit.train.config import LORA_OPTIONS, default_lora

    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        if field.name == "lora":
            lora_hints, lora_fields = typing.get_type_hints(LoraConfig), dataclasses.fields(LoraConfig)
            lora = default_lora()
            out.extend((f, lora_hints[f.name], getattr(lora, f.name)) for f in lora_fields if f.name in LORA_OPTIONS)
        else:
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            out.append((field, hints[field.name], default))
    return out


def config_parameters(cls: type) -> list[inspect.Parameter]:
    """Keyword-only parameters for Typer: one per option of `cls`."""
    params = []
    for field, annotation, default in option_fields(cls):
        cli_type = _cli_type(annotation)
        if any(typing.get_origin(a) is list for a in (cli_type, *typing.get_args(cli_type))):
            default = _as_list(default)
        option = typer.Option(*field.metadata.get("flags", ()), help=field_help(field),
                              rich_help_panel=field.metadata.get("panel"))
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[cli_type, option]))
    return params


def cli_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Typer's values in the config's terms: comma-separated list entries split, `NAME=VALUE` entries of a
    mapping option parsed, and options left unset (None where the config accepts no None) dropped."""
    import yaml

    out: dict[str, Any] = {}
    for field, annotation, _ in option_fields(cls):
        value = values.get(field.name)
        if value is None and not _accepts_none(annotation):
            continue
        if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
            value = split_commas(value)
            if _mapping(annotation):
                value = dict(_key_value(item, field.name, yaml) for item in value)
        out[field.name] = value
    return out


def _key_value(item: str, name: str, yaml: Any) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise typer.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint=f"--{name.replace('_', '-')}")
    return key.strip(), yaml.safe_load(text)


def _cli_type(annotation: Any) -> Any:
    """The type Typer parses for an option: a mapping or a union with a list becomes a repeatable list of
    strings (or ints), `bool | str` a string; None stays allowed where the field allows it."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if _is_union(annotation) else [annotation]
    if _mapping(annotation):
        base: Any = list[str]
    elif any(typing.get_origin(a) is list for a in args):
        base = next(a for a in args if typing.get_origin(a) is list)
    elif len(args) > 1:
        base = str
    else:
        base = args[0]
    return typing.Optional[base] if _accepts_none(annotation) or typing.get_origin(base) is list else base  # noqa: UP045


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _accepts_none(annotation: Any) -> bool:
    return _is_union(annotation) and type(None) in typing.get_args(annotation)


def _mapping(annotation: Any) -> bool:
    args = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    return any(typing.get_origin(a) is dict for a in args)


def _as_list(default: Any) -> Any:
    if default is None or isinstance(default, list):
        return default
    if isinstance(default, dict):
        return [f"{k}={v}" for k, v in default.items()] or None
    return [default]


def split_commas(values: list[str] | None) -> list[str] | None:
    """`--target-modules q_proj,v_proj` and repeated flags both give ['q_proj', 'v_proj']."""
    if values is None:
        return None
    return [part.strip() for value in values for part in str(value).split(",") if part.strip()]
