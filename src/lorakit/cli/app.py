"""The `lorakit` command: a Typer app (help generated from type hints) with YAML config files.

Every command takes `--config FILE.yaml`; its keys are the command's options (dash or underscore form)
and flags given on the command line override them (Click's `default_map`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from lorakit.options import TRUST_REMOTE_CODE_HELP

app = typer.Typer(
    name="lorakit",
    help="LoRA fine-tuning: train, merge, inspect and serve adapters (PEFT-compatible).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root() -> None:
    """LoRA fine-tuning: train, merge, inspect and serve adapters (PEFT-compatible).
    Add --debug for tracebacks."""


FileCheck = Callable[[dict[str, Any], str], dict[str, Any]]


def config_callback(check: FileCheck | None = None) -> Callable[..., Any]:
    """The callback of a `--config` option: it reads the YAML file into the command's defaults, so explicit
    flags still win. `check(values, file)`, where given, types the file's values first (a ValueError names
    the file and key)."""

    def load_config(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
        from lorakit.options import read_yaml

        if value is None:
            return None
        try:
            data = read_yaml(value)
            known = {p.name for p in ctx.command.params if p.name not in ("config",)}
            unknown = [key for key in data if key not in known]
            if unknown:
                options = ", ".join(sorted(k.replace("_", "-") for k in known))
                raise ValueError(f"{value}: unknown key {unknown[0]!r}; valid keys: {options}")
            if check is not None:
                data = check(data, str(value))
        except ValueError as err:
            raise typer.BadParameter(str(err), ctx, param) from None
        ctx.default_map = {**(ctx.default_map or {}), **data}
        return value

    return load_config


CONFIG_HELP = "YAML file of options (same names); command-line flags override it."

ConfigOption = typer.Option("--config", help=CONFIG_HELP, callback=config_callback(), is_eager=True)
"""A `--config` option without typed checks of the file; `lorakit.cli.options.config_command` gives each
command generated from a config class its own, which checks the file's values against the class."""

TrustRemoteCodeOption = typer.Option(help=TRUST_REMOTE_CODE_HELP)
"""Use as `trust_remote_code: Annotated[bool, TrustRemoteCodeOption] = False` where a command loads a
model (commands generated from a config take TRUST_REMOTE_CODE_HELP as a field's help instead)."""
