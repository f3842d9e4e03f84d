"""Typed options: the one path by which command-line flags, YAML files and Python dicts become configs.

A config is a dataclass whose field annotations say what each option accepts (`int`, `float`, `bool`,
`str`, `X | None`, `list[str]`, `dict[str, int]`, `Literal["a", "b"]`, ...), declared with `option(...)`
(or `argument(...)` for a positional one) so that its help text lives with it. `check_value` holds a value
to its annotation and `read_yaml` reads an option file. A config class derives from `Options`, which checks
every field when the config is built and reads flat options with `from_options`: `lorakit merge --config
merge.yaml`, `MergeConfig.from_yaml` and `MergeConfig.from_options` all go through them, so a file, a flag
and a dict are judged the same way. The CLI's commands are generated from these classes
(`lorakit.cli.options`).

Errors are `OptionError`s (a ValueError): one line naming the option in its command-line form (`--seed`)
or, for a file, the file and key (`run.yaml: key 'seed'`), what it accepts and what it got.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

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
    if origin is Literal:
        return _choices(args)
    if origin is list:
        return f"a list of {_PLURAL.get(args[0], 'values')}"
    if origin is dict:
        return f"a mapping of names to {_PLURAL.get(args[1], 'values')}"
    return _WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _choices(values: tuple[Any, ...]) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


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
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in args) else _INVALID
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
           flags: tuple[str, ...] = (), panel: str | None = None, commas: bool = True) -> Any:
    """A config field that is also a command-line option (`--field-name`); no default: a required one.

    help: its help text. flags: its spellings when not just `--field-name` (`("--output", "-o")`, or
    `("--json",)` for a switch without a `--no-json` form). panel: its help panel. commas: whether a list
    option's values are split at commas (`--only a,b` = `--only a --only b`); off for paths.
    """
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, "flags": flags, "panel": panel, "commas": commas})


def argument(default: Any = dataclasses.MISSING, *, help: str) -> Any:
    """A config field that is a positional command-line argument (`lorakit inspect ADAPTER`)."""
    return dataclasses.field(default=default, metadata={"help": help, "argument": True})


def field_help(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")


TRUST_REMOTE_CODE_HELP = ("Allow a model that ships its own Python code (auto_map) to run it; only for "
                          "sources you trust.")


C = TypeVar("C", bound="Options")


class Options:
    """Base of a `@dataclass` config: every field is checked against its annotation when the config is
    built (`check_value`), then `validate` checks ranges and combinations; `from_options` builds one from
    flat options (flags, YAML keys, dict keys), `from_yaml` from an option file."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            setattr(self, field.name, check_value(field.name, getattr(self, field.name), hints[field.name]))
        self.validate()

    def validate(self) -> None:
        """Checks beyond each value's type; raise OptionError (or ValueError) naming the option's flag."""

    @classmethod
    def option_names(cls) -> list[str]:
        """Every option name, in declaration order."""
        return [field.name for field in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_values(cls: type[C], values: dict[str, Any]) -> C:
        """Build from option values keyed by option name (all of them known)."""
        return cls(**values)

    @classmethod
    def from_options(cls: type[C], options: Mapping[str, Any], source: str | None = None) -> C:
        """Build from flat options (CLI flags, YAML keys, dict keys; dash or underscore form).

        `source` names the file the options came from; errors then name it and the key.
        """
        known = set(cls.option_names())
        values: dict[str, Any] = {}
        for key, value in options.items():
            name = option_name(key)
            if name not in known:
                raise ValueError(f"{source or 'options'}: unknown key {key!r}; valid keys: "
                                 f"{', '.join(sorted(known))}")
            values[name] = value
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if required and field.name not in values:
                where = f"{source}: key {field.name!r}" if source else flag(field.name)
                raise ValueError(f"{where}: required, not given")
        try:
            return cls.from_values(values)
        except OptionError as err:
            if source is None:
                raise
            raise ValueError(err.describe(source)) from None
        except ValueError as err:
            if source is None:
                raise
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls: type[C], path: str | Path, **overrides: Any) -> C:
        """Read a YAML option file (the file `--config` takes); `overrides` win over its keys."""
        return cls.from_options({**read_yaml(path), **overrides}, source=str(path))


def positive_ints(config: Any, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Raise for a field of `required` that is not a positive integer, or of `optional` that is neither
    that nor None."""
    for name in required + optional:
        value = getattr(config, name)
        if not (value is None and name in optional) and value <= 0:
            raise OptionError(name, "a positive integer", value)


def one_of(config: Any, name: str, choices: tuple[str, ...]) -> None:
    if getattr(config, name) not in choices:
        raise OptionError(name, " or ".join(choices), getattr(config, name))
