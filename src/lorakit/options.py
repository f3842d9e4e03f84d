"""Typed options: the one path by which command-line flags, YAML files and Python dicts become configs.

A config is a dataclass whose field annotations say what each option accepts (`int`, `float`, `bool`,
`str`, `X | None`, `list[str]`, `dict[str, int]`, ...). `check_value` holds a value to its annotation and
`read_yaml` reads an option file; `lorakit train --config run.yaml`, `TrainConfig.from_yaml` and
`TrainConfig.from_options` all go through them, so a file, a flag and a dict are judged the same way.

Errors are `OptionError`s (a ValueError): one line naming the option in its command-line form (`--seed`)
or, for a file, the file and key (`run.yaml: key 'seed'`), what it accepts and what it got.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class OptionError(ValueError):
    """An option's value is not what the option accepts."""

    def __init__(self, name: str, expected: str, value: Any, owner: str = "--") -> None:
        self.name, self.expected, self.value, self.owner = name, expected, value, owner
        super().__init__(self.describe())

    def describe(self, source: str | None = None) -> str:
        """`--seed: expected ...` (owner "--"), `LoraConfig.r: expected ...`, or with a source file
        `run.yaml: key 'seed': expected ...`."""
        if source is not None:
            where = f"{source}: key {self.name!r}"
        elif self.owner == "--":
            where = flag(self.name)
        else:
            where = f"{self.owner}.{self.name}"
        return f"{where}: expected {self.expected}, got {self.value!r}"


def flag(name: str) -> str:
    """The command-line form of an option name: `lora_alpha` → `--lora-alpha`."""
    return "--" + name.replace("_", "-")


def option_name(key: Any) -> str:
    """A YAML key or flag name in field form: `lora-alpha` → `lora_alpha`."""
    return str(key).strip().lstrip("-").replace("-", "_")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML option file (empty file: no options); errors name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return {option_name(key): value for key, value in data.items()}


def describe_type(annotation: Any) -> str:
    """What an annotation accepts, in words: `int | None` → 'an integer or null'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin is list:
        return f"a list of {_PLURAL.get(args[0], 'values')}"
    if origin is dict:
        return f"a mapping of names to {_PLURAL.get(args[1], 'values')}"
    return _WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
_PLURAL = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def check_value(name: str, value: Any, annotation: Any, owner: str = "--") -> Any:
    """`value` if it has the annotated type (an int where a float is expected becomes a float, a
    comma-separated string where a list of strings is expected becomes the list); else OptionError."""
    converted = _convert(value, annotation)
    if converted is _INVALID:
        raise OptionError(name, describe_type(annotation), value, owner)
    return converted


_INVALID = object()


def _convert(value: Any, annotation: Any) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        # Exact types first, so that `bool | str` keeps True a bool and `float | None` keeps None.
        for arg in sorted(args, key=lambda a: a is not type(value)):
            converted = _convert(value, arg)
            if converted is not _INVALID:
                return converted
        return _INVALID
    if origin is list:
        if isinstance(value, str) and args[0] is str:
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            return _INVALID
        items = [_convert(item, args[0]) for item in value]
        return _INVALID if any(item is _INVALID for item in items) else items
    if origin is dict:
        if not isinstance(value, dict):
            return _INVALID
        converted = {key: _convert(item, args[1]) for key, item in value.items()}
        if not all(isinstance(key, str) for key in value) or _INVALID in converted.values():
            return _INVALID
        return converted
    return _scalar(value, annotation)


def _scalar(value: Any, annotation: Any) -> Any:
    if annotation is type(None):
        return None if value is None else _INVALID
    if annotation is bool:
        return value if isinstance(value, bool) else _INVALID
    if annotation is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _INVALID
        return float(value)
    if annotation is str:
        return value if isinstance(value, str) else _INVALID
    if annotation is Any:
        return value
    return value if isinstance(annotation, type) and isinstance(value, annotation) else _INVALID


def finite(value: Any) -> bool:
    """A real number (not a bool, NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
           flags: tuple[str, ...] = (), panel: str | None = None) -> Any:
    """A config field that is also a command-line option: its help text, extra flag spellings (`-o`) and
    help panel live with the field, so the CLI is generated from the config (`lorakit.cli.options`)."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, "flags": flags, "panel": panel})


def field_help(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")
