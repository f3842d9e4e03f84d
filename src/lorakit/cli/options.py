"""Build a command's options from a config dataclass, so the dataclass stays the one source of truth.

Each field becomes `--field-name` with the field's type and default; `help` gives each its text.
The `--config FILE.yaml` option (cli/app.py) fills the same names from a file.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from lorakit.cli.app import ConfigOption


def dataclass_parameters(cls: type, help: dict[str, str], panels: dict[str, str] | None = None) -> list[inspect.Parameter]:
    """Keyword-only parameters for every field of `cls` (its defaults and types, the given help)."""
    hints = typing.get_type_hints(cls)
    params = []
    for field in dataclasses.fields(cls):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        option = typer.Option(help=help.get(field.name, ""), rich_help_panel=(panels or {}).get(field.name))
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[hints[field.name], option]))
    return params


def with_signature(function: Callable[..., Any], params: list[inspect.Parameter]) -> Callable[..., Any]:
    """Give `function(**options)` an explicit signature (plus --config) for Typer to read."""
    config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation=Annotated[typing.Optional[Path], ConfigOption])  # noqa: UP045
    function.__signature__ = inspect.Signature([config, *params])  # type: ignore[attr-defined]
    return function


def split_commas(values: list[str] | None) -> list[str] | None:
    """`--target-modules q_proj,v_proj` and repeated flags both give ['q_proj', 'v_proj']."""
    if values is None:
        return None
    return [part.strip() for value in values for part in str(value).split(",") if part.strip()]
