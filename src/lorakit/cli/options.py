"""Commands generated from config dataclasses, so the dataclass stays the one source of truth.

Each field of the config becomes `--field-name` with the field's type, default (none: a required option),
help text, help panel and other spellings (declared with `lorakit.options.option`), or a positional
argument (`lorakit.options.argument`). A `Literal` field offers its choices; a list field is repeatable and,
unless declared `commas=False`, also takes comma-separated values, each parsed as the list's item type; a
mapping field takes repeated `NAME=VALUE`. A trainer config's `lora` field stands for the LoraConfig fields
in `train.config.LORA_OPTIONS`, each its own option (`--r`, `--lora-alpha`, ...).

Every command also takes `--config FILE.yaml`: the file's keys are the same names, each value is checked
against its option's type as it is read (errors name the file and key), and flags override it. The command
builds its config with the class's `from_options`, the same path a YAML file or a dict takes in Python.
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

from lorakit.cli.app import CONFIG_HELP, config_callback
from lorakit.options import OptionError, check_value, field_help, flag


def config_command(cls: type, run: Callable[[Any], None]) -> Callable[..., None]:
    """A Typer command function for config class `cls`: its options are the config's fields, its body
    `run(cls.from_options(options))`, its help text `run`'s docstring."""

    def command(**options: Any) -> None:
        options.pop("config", None)
        run(cls.from_options(cli_values(cls, options)))

    command.__doc__ = run.__doc__
    option = typer.Option("--config", help=CONFIG_HELP, is_eager=True,
                          callback=config_callback(lambda values, source: file_values(cls, values, source)))
    config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation=Annotated[typing.Optional[Path], option])  # noqa: UP045
    command.__signature__ = inspect.Signature([config, *config_parameters(cls)])  # type: ignore[attr-defined]
    return command


def option_fields(cls: type) -> list[tuple[dataclasses.Field, Any, Any]]:
    """(field, its type, its default or MISSING) for every option of `cls`, a trainer's `lora` expanded."""
    from lorakit.config import LoraConfig
    from lorakit.train.config import LORA_OPTIONS, default_lora

    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        if field.name == "lora":
            lora_hints, lora_fields = typing.get_type_hints(LoraConfig), dataclasses.fields(LoraConfig)
            lora = default_lora()
            out.extend((f, lora_hints[f.name], getattr(lora, f.name))
                       for f in lora_fields if f.name in LORA_OPTIONS)
        else:
            default = field.default
            if field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            out.append((field, hints[field.name], default))
    return out


def config_parameters(cls: type) -> list[inspect.Parameter]:
    """Keyword-only parameters for Typer: one per option or argument of `cls`."""
    params = []
    for field, annotation, default in option_fields(cls):
        cli_type = _cli_type(annotation)
        listed = typing.get_origin(_without_none(cli_type)) is list
        if default is dataclasses.MISSING:
            default = inspect.Parameter.empty  # Typer: required
        elif listed:
            default = _as_list(default)
        if field.metadata.get("argument"):
            info = typer.Argument(help=field_help(field))
        else:
            commas = listed and field.metadata.get("commas", True)
            info = typer.Option(*field.metadata.get("flags", ()), help=field_help(field),
                                rich_help_panel=field.metadata.get("panel"),
                                parser=_comma_separated(_item_type(cli_type)) if commas else None)
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[cli_type, info]))
    return params


def _comma_separated(item_type: type) -> Callable[[Any], list[Any]]:
    """A parser for one value of a list option: `a,b` → [a, b], each parsed as `item_type` (values from a
    YAML file that are no strings are left to the config's typed check)."""

    def parse(value: Any) -> list[Any]:
        if not isinstance(value, str):
            return [value]
        parts = [part.strip() for part in value.split(",") if part.strip()]
        try:
            return [item_type(part) for part in parts]
        except ValueError:
            raise typer.BadParameter(f"expected {_NUMBERS[item_type]}, got {value!r}") from None

    return parse


_NUMBERS = {int: "integers, comma-separated (e.g. 0,1)", float: "numbers, comma-separated (e.g. 0.7,0.3)"}


def cli_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Typer's values in the config's terms: comma-split list entries joined into one list, `NAME=VALUE`
    entries of a mapping option parsed, and options left unset (None where the config accepts no None)
    dropped."""
    import yaml

    out: dict[str, Any] = {}
    for field, annotation, _ in option_fields(cls):
        value = values.get(field.name)
        if value is None and not _accepts_none(annotation):
            continue
        if isinstance(value, (list, tuple)):
            value = [part for item in value for part in (item if isinstance(item, list) else [item])]
            if _mapping(annotation):
                value = dict(_key_value(str(item), field.name, yaml) for item in value)
        out[field.name] = value
    return out


def file_values(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """The values of an option file for `cls`'s command, each checked against its option's type (errors
    name the file and key), in the form the command line gives them: a mapping as NAME=VALUE entries, a
    single value of a list option as a list."""
    types = {field.name: annotation for field, annotation, _ in option_fields(cls)}
    out = {}
    for name, value in values.items():
        try:
            value = check_value(name, value, types[name])
        except OptionError as err:
            raise ValueError(err.describe(source)) from None
        if typing.get_origin(_without_none(_cli_type(types[name]))) is list and not isinstance(value, list):
            value = _as_list(value)
        out[name] = value
    return out


def _key_value(item: str, name: str, yaml: Any) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise typer.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint=flag(name))
    return key.strip(), yaml.safe_load(text)


def _cli_type(annotation: Any) -> Any:
    """The type Typer parses for an option: a mapping or a union with a list becomes a repeatable list of
    strings (or ints), `bool | str` a string; None stays allowed where the field allows it."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if not _is_union(annotation):
        args = [annotation]
    if _mapping(annotation):
        base: Any = list[str]
    elif any(typing.get_origin(a) is list for a in args):
        base = next(a for a in args if typing.get_origin(a) is list)
    elif len(args) > 1:
        base = str
    else:
        base = args[0]
    return typing.Optional[base] if _accepts_none(annotation) or typing.get_origin(base) is list else base  # noqa: UP045


def _without_none(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if _is_union(annotation) and len(args) == 1 else annotation


def _item_type(list_type: Any) -> Any:
    return typing.get_args(_without_none(list_type))[0]


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
